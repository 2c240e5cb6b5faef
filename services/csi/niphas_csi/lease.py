"""Leases on the requested store paths, in the layout niphas_common.leases shares with the mesh.

One directory per volume, one symlink per requested path (`<hash>-<name>` -> `/nix/store/...`).
Nix keeps every path a root refers to, so leasing the requested paths keeps their whole
closure: one link per requested path instead of one per closure path, which stays cheap for
closures of thousands of paths. A lease is taken before the paths are even present (a link to
a path that is not valid yet is ignored by GC until the path arrives, then holds it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from niphas_common import leases


class Leases:
    def __init__(self, store_root: Path | None) -> None:
        self.store_root = store_root or ""

    def take(self, volume_id: str, store_paths: Iterable[str]) -> None:
        directory = leases.volume_dir(volume_id, self.store_root)
        directory.mkdir(parents=True, exist_ok=True)
        for path in store_paths:
            link = directory / os.path.basename(path)
            with contextlib.suppress(FileExistsError):
                os.symlink(path, link)

    def release(self, volume_id: str) -> None:
        directory = leases.volume_dir(volume_id, self.store_root)
        # Links first, then the directory; a crash in between leaves only an empty directory.
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(directory):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(directory)

    def held(self, volume_id: str) -> set[str]:
        """The store paths `volume_id` holds (empty when it holds none)."""
        directory = leases.volume_dir(volume_id, self.store_root)
        try:
            return {
                os.readlink(entry.path) for entry in os.scandir(directory) if entry.is_symlink()
            }
        except FileNotFoundError:
            return set()

    def volumes(self) -> set[str]:
        """Every volume id holding a lease directory."""
        try:
            return {entry.name for entry in os.scandir(leases.leases_root(self.store_root))}
        except FileNotFoundError:
            return set()
