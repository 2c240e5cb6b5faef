"""The wrapper flake: one directory per evaluation, holding a flake.nix that takes the pushed
commit as its input `target` and returns what the commit provides for one system, and the
flake.lock that pins `target` and every input of the pushed flake (see flakelock.py). The
flake.nix is wrapper.nix, a file of this package.

The wrapper is our own `path:` flake, trusted; the pushed code only ever runs as `target`.
Its output `result` lists, for every attribute of `packages.<system>` and of an optional
`niphas` output (`niphas.<system>` when it has the system, else `niphas` itself): drvPath,
output paths, name, system and meta.mainProgram, plus the target's locked rev and narHash; an
attribute that throws or fails an assertion fails alone (`builtins.tryEval`).
"""

from __future__ import annotations

import json
import shutil
import uuid
from importlib import resources
from pathlib import Path
from typing import Any

_WRAPPER = (resources.files("niphas_eval") / "wrapper.nix").read_text()
"""The wrapper's flake.nix (wrapper.nix beside this module, shipped in the package), with
`@SYSTEM@` and `@TARGET@` to fill in."""


def nix_string(text: str) -> str:
    """`text` as a Nix string literal (JSON's escapes, and `${` kept literal)."""
    return json.dumps(text).replace("${", "\\${")


class WrapperDir:
    """A fresh wrapper flake for one evaluation, removed afterwards (`with` block)."""

    def __init__(self, parent: Path, system: str, pinned: str, lock: dict[str, Any]) -> None:
        self.path = parent / f"eval-{system}-{uuid.uuid4().hex[:12]}"
        self.path.mkdir(parents=True)
        text = _WRAPPER.replace("@SYSTEM@", system).replace("@TARGET@", nix_string(pinned))
        (self.path / "flake.nix").write_text(text)
        (self.path / "flake.lock").write_text(json.dumps(lock, indent=2, sort_keys=True) + "\n")

    @property
    def ref(self) -> str:
        return f"path:{self.path}"

    def __enter__(self) -> WrapperDir:
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
