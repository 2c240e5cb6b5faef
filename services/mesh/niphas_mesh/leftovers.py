"""What a failed import (or a crash) leaves in the store directory and in `incoming/`, and
removing it.

Nix restores a substituted path in place (`<store>/<hash>-<name>`, under `<name>.lock`) and
registers it valid only at the end. When the restore fails (a full disk) the partial tree and
the lock file stay, and nothing removes them: our GC deletes valid paths only and Nix's would
need a full collection. So the disk would stay full. We remove them the way Nix removes a stale
lock: only while holding that lock (so never under an import that is still writing), and only
if Nix says the path is still not valid.

A crash (the agent SIGKILLed, its `nix copy` with it) leaves the same partial trees and locks,
plus downloads in `incoming/` that nobody will import: `.<hash>.nar.partial` files, and landed
NARs with their narinfos. `after_crash` removes both when the agent starts, before anything
imports. In the store it only considers invalid paths that have a lock file (what an
interrupted import or build leaves; never, say, a build's `.chroot` directory), under the same
lock rule, so an import or build still running in another process keeps its path.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from niphas_common.nix.errors import StorePathError
from niphas_common.nix.store_path import StorePath

from .store import NodeStore

log = logging.getLogger(__name__)


async def after_crash(store: NodeStore, incoming: Path) -> list[Path]:
    """Remove what a previous run of the agent left unfinished (call on start, after the
    store's catalogue was read); what was removed."""
    removed = clear_incoming(incoming)
    removed += await remove_partial(store, locked_invalid(store), "an interrupted import")
    if removed:
        log.info("removed %d leftovers of an earlier run", len(removed))
    return removed


def clear_incoming(incoming: Path) -> list[Path]:
    """Remove every download in `incoming/` (on start nothing is in flight: they are all
    stale). Its `nix-cache-info` stays."""
    nars = incoming / "nar"
    found = [*incoming.glob("*.narinfo"), *(nars.iterdir() if nars.is_dir() else ())]
    removed = []
    for file in found:
        try:
            file.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cannot remove %s, left by an earlier run: %s", file, exc)
            continue
        log.info("removed %s, a download an earlier run did not import", file)
        removed.append(file)
    return removed


def locked_invalid(store: NodeStore) -> list[StorePath]:
    """Paths with a lock file in the store directory that the catalogue does not hold."""
    try:
        names = os.listdir(store.real_store)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        if not name.endswith(".lock"):
            continue
        try:
            path = StorePath.from_base_name(name.removesuffix(".lock"))
        except StorePathError:
            continue
        if path not in store:
            found.append(path)
    return sorted(found)


async def remove_partial(
    store: NodeStore, paths: list[StorePath], left_by: str = "a failed import"
) -> list[Path]:
    """Remove the files and lock of each of `paths` that `left_by` left invalid; the trees
    (or lone locks) removed."""
    removed: list[Path] = []
    if not paths:
        return removed
    await store.refresh(paths)
    for path in paths:
        if path in store:
            continue  # imported after all: a valid path is never touched
        real = store.real_path(path)
        lock = real.with_name(real.name + ".lock")
        if not _exists(real, lock):
            continue  # the failed copy never reached this path
        with _locked(lock) as held:
            if not held:
                log.info("not removing %s: another process holds its lock", real)
                continue
            await store.refresh([path])  # valid now: completed by whoever held the lock
            if path in store:
                continue
            try:
                _remove(real)
            except OSError as exc:
                log.warning("cannot remove %s, left invalid by %s: %s", real, left_by, exc)
                continue
            log.info("removed %s, left invalid by %s", real, left_by)
            removed.append(real)
    return removed


@contextlib.contextmanager
def _locked(lock: Path) -> Iterator[bool]:
    """Hold `lock` as Nix does (flock on `<path>.lock`); yield False if another holds it.
    On the way out the lock file is deleted the way Nix deletes one: a waiter that then gets
    the lock finds the `d` token and knows it is stale."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        log.warning("cannot open %s: %s", lock, exc)
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
        lock.unlink(missing_ok=True)
        os.write(fd, b"d")
    finally:
        os.close(fd)


def _exists(real: Path, lock: Path) -> bool:
    return os.path.lexists(real) or os.path.lexists(lock)


def _remove(real: Path) -> None:
    if not real.is_dir() or real.is_symlink():
        real.unlink(missing_ok=True)
        return

    def writable_and_retry(
        func: Callable[[str], object], name: str, exc_info: tuple[type, BaseException, object]
    ) -> None:
        # Restored directories may already be read-only (Nix canonicalises as it goes);
        # the store directory itself is never changed.
        parent = Path(name).parent
        if parent == real.parent:
            raise exc_info[1]
        parent.chmod(0o700)
        func(name)

    shutil.rmtree(real, onerror=writable_and_retry)
