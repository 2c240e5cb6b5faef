"""Modules over 400 lines and functions over 60 lines (the size rule), generated code excepted.

    .venv/bin/python scripts/sizes.py [DIR ...]    # default: every Python source dir

A function's size runs from its `def` line to its last line (its docstring and nested
functions included); exits 1 when anything is over.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DIRS = ("libs", "schemas", "services", "tests", "bench", "demo", "chaos", "cluster", "scripts")
MAX_MODULE = 400
MAX_FUNCTION = 60


def generated(path: Path) -> bool:
    return path.name.endswith(("_pb2.py", "_pb2_grpc.py", "_pb2.pyi"))


def offenders(path: Path) -> list[tuple[int, str]]:
    """(lines, what) for each oversized unit of one module."""
    text = path.read_text()
    found = []
    lines = len(text.splitlines())
    if lines > MAX_MODULE:
        found.append((lines, "module"))
    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            size = (node.end_lineno or node.lineno) - node.lineno + 1
            if size > MAX_FUNCTION:
                found.append((size, f"{node.name} (line {node.lineno})"))
    return found


def main(dirs: list[str]) -> int:
    over = 0
    for top in dirs or DIRS:
        for path in sorted((ROOT / top).rglob("*.py")):
            if generated(path) or ".venv" in path.parts:
                continue
            for size, what in offenders(path):
                print(f"{size:5d}  {path.relative_to(ROOT)}: {what}")
                over += 1
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
