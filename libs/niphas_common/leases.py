"""Leases: GC roots that keep a mounted volume's closure alive, shared by csi and mesh.

The CSI driver holds one directory per mounted volume,

    <store root>/nix/var/nix/gcroots/niphas/csi/<volume id>/<link>

each `<link>` a symlink to a store path (logical `/nix/store/...`, also for chroot stores).
Nix's own garbage collector treats every symlink under `gcroots/` as a root, so neither
`nix-collect-garbage` nor `nix store delete` removes a leased path or anything it references;
the mesh's collector also never picks them as candidates. Leases are plain files, so they
outlive restarts of either service. An empty store root means the host store (`/`).

`Leases` is the csi's side: one symlink per requested path (`<hash>-<name>` -> `/nix/store/...`).
Nix keeps every path a root refers to, so leasing the requested paths keeps their whole
closure: one link per requested path instead of one per closure path, which stays cheap for
closures of thousands of paths. A lease is taken before the paths are even present (a link to
a path that is not valid yet is ignored by GC until the path arrives, then holds it).
`leased_paths` is the mesh collector's side.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from niphas_schemas.types import STORE_DIR

LEASES_DIR = "nix/var/nix/gcroots/niphas/csi"
"""The lease directory, relative to the store root."""


def leases_root(store_root: str | os.PathLike[str] = "") -> Path:
    """`<store root>/nix/var/nix/gcroots/niphas/csi` (the host's when `store_root` is empty)."""
    return Path(os.fspath(store_root) or "/") / LEASES_DIR


def volume_dir(volume_id: str, store_root: str | os.PathLike[str] = "") -> Path:
    """The directory holding one volume's lease links."""
    if not volume_id or "/" in volume_id or volume_id in (".", ".."):
        raise ValueError(f"not a usable volume id: {volume_id!r}")
    return leases_root(store_root) / volume_id


def leased_paths(store_root: str | os.PathLike[str] = "") -> set[str]:
    """Every store path some volume's lease points at (logical paths, not their closures)."""
    found: set[str] = set()
    root = leases_root(store_root)
    prefix = STORE_DIR + "/"
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + dirnames:
            link = Path(dirpath) / name
            if not link.is_symlink():
                continue
            target = os.readlink(link)
            if target.startswith(prefix):
                # Only the store path itself, never a file inside it.
                found.add(prefix + target[len(prefix) :].split("/", 1)[0])
    return found


class Leases:
    def __init__(self, store_root: Path | None) -> None:
        self.store_root = store_root or ""

    def take(self, volume_id: str, store_paths: Iterable[str]) -> None:
        directory = volume_dir(volume_id, self.store_root)
        directory.mkdir(parents=True, exist_ok=True)
        for path in store_paths:
            link = directory / os.path.basename(path)
            with contextlib.suppress(FileExistsError):
                os.symlink(path, link)

    def release(self, volume_id: str) -> None:
        directory = volume_dir(volume_id, self.store_root)
        # Links first, then the directory; a crash in between leaves only an empty directory.
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(directory):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(directory)

    def held(self, volume_id: str) -> set[str]:
        """The store paths `volume_id` holds (empty when it holds none)."""
        directory = volume_dir(volume_id, self.store_root)
        try:
            return {
                os.readlink(entry.path) for entry in os.scandir(directory) if entry.is_symlink()
            }
        except FileNotFoundError:
            return set()

    def volumes(self) -> set[str]:
        """Every volume id holding a lease directory."""
        try:
            return {entry.name for entry in os.scandir(leases_root(self.store_root))}
        except FileNotFoundError:
            return set()
