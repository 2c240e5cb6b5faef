"""What a failed import left in a real chroot store is removed: the partly restored (invalid)
tree, read-only directories included, and its lock; a valid path is never touched, nor an
invalid one whose lock another process holds (an import still writing it). On start, what an
earlier run left is removed: invalid paths with a lock file (a tree or a lone lock), never an
invalid directory without one, and every download in `incoming/`."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest

from niphas_common.nix.runner import NixRunner
from niphas_common.nix.signing import TrustedKeys
from niphas_common.nix.store_path import StorePath
from niphas_mesh.leftovers import after_crash, remove_partial
from niphas_mesh.store import NodeStore

pytestmark = [pytest.mark.nix, pytest.mark.root]


def partial(store: NodeStore, name: str) -> tuple[StorePath, Path, Path]:
    """An invalid path's tree (with a read-only directory, as Nix leaves some) and its lock."""
    path = StorePath.parse(f"/nix/store/{name[0] * 32}-{name}")
    real = store.real_path(path)
    (real / "sub").mkdir(parents=True)
    (real / "sub" / "blob").write_bytes(b"half")
    (real / "sub").chmod(0o555)
    lock = real.with_name(real.name + ".lock")
    lock.touch()
    return path, real, lock


async def test_removes_what_a_failed_import_left_and_nothing_else(tmp_path: Path) -> None:
    root = tmp_path / "node"
    src = tmp_path / "niphas-valid"
    src.mkdir()
    (src / "file").write_text("kept")
    added = NixRunner(store=str(root)).run("nix-store", "--add", str(src))
    valid = StorePath.parse(added.text.strip())
    store = NodeStore(str(root), TrustedKeys())
    await store.scan()
    left, left_real, left_lock = partial(store, "aleft")
    busy, busy_real, busy_lock = partial(store, "bbusy")

    fd = os.open(busy_lock, os.O_RDWR)  # another import holds this one's lock
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        await remove_partial(store, [valid, left, busy])
    finally:
        os.close(fd)

    assert not left_real.exists() and not left_lock.exists()
    assert busy_real.exists() and busy_lock.exists()
    assert (store.real_path(valid) / "file").read_text() == "kept"
    assert valid in store


async def test_on_start_only_locked_invalid_paths_and_downloads_go(tmp_path: Path) -> None:
    root = tmp_path / "node"
    src = tmp_path / "niphas-valid"
    src.mkdir()
    (src / "file").write_text("kept")
    added = NixRunner(store=str(root)).run("nix-store", "--add", str(src))
    valid = StorePath.parse(added.text.strip())
    store = NodeStore(str(root), TrustedKeys())
    await store.scan()
    _, left_real, left_lock = partial(store, "aleft")
    lone_lock = store.real_store / f"{'c' * 32}-lone.lock"
    lone_lock.touch()
    # No lock: not what an import leaves (a build's `.chroot` directory, say): not ours.
    unlocked = store.real_store / f"{'d' * 32}-build.drv.chroot"
    unlocked.mkdir()
    incoming = tmp_path / "incoming"
    (incoming / "nar").mkdir(parents=True)
    (incoming / "nix-cache-info").write_text("StoreDir: /nix/store\n")
    stale = [incoming / f"{'e' * 32}.narinfo", incoming / "nar" / f"{'e' * 32}.nar"]
    stale.append(incoming / "nar" / f".{'f' * 32}.nar.partial")
    for file in stale:
        file.write_text("stale")

    removed = await after_crash(store, incoming)

    assert not left_real.exists() and not left_lock.exists() and not lone_lock.exists()
    assert unlocked.is_dir()
    assert (store.real_path(valid) / "file").read_text() == "kept"
    assert not any(file.exists() for file in stale)
    assert (incoming / "nix-cache-info").exists()
    assert set(stale) | {left_real} <= set(removed)
