"""Services use the bus only through its API: import-linter keeps `nats` out of them
(pyproject.toml), and this test keeps them off the `Bus`'s raw connection (`.nc`) and
JetStream context (`.js`), which the library and tests may still use."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RAW = {"nc", "js", "_nc", "_js"}


def raw_uses(source: Path) -> list[str]:
    tree = ast.parse(source.read_text(), str(source))
    return [
        f"{source.relative_to(ROOT)}:{node.lineno}: .{node.attr}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr in RAW
    ]


def test_services_do_not_reach_past_the_bus() -> None:
    found = [
        use
        for service in sorted((ROOT / "services").iterdir())
        if service.is_dir()
        for source in sorted(service.rglob("*.py"))
        for use in raw_uses(source)
    ]
    assert found == []
