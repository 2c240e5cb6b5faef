"""Importing verified downloads into the node's store, several paths per `nix copy`.

Downloads land in `incoming/`, a file:// binary cache (narinfo + uncompressed NAR). Paths whose
references are already valid are imported with `nix copy --no-recursive --from file://incoming`:
Nix checks the builder's signature and the NarHash once more, restores the tree and registers it
valid with its references and signatures, so `nix path-info` and `nix store verify` see an
ordinary substituted path. Paths that become ready while a copy runs are batched into the next
one (one Nix process start per batch rather than per path), and a ready path waits while other
downloads of the node are still landing bytes (up to `GATHER_MAX_S`; not while they only wait
for a busy or stalled holder, `GATHER_IDLE_S`), so a closure fetched at once
is imported in one `nix copy` and one `nix path-info` rather than one of each per path that
happened to land first: each Nix process costs ~25 ms of CPU, most of a second of a node
under a tight CPU quota. A failed copy leaves partly
restored paths behind (`leftovers`); they are removed, and the batch is retried path by path.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from niphas_common.nix.errors import CommandError, NixError
from niphas_common.nix.narinfo import NarInfo
from niphas_common.nix.store_path import StorePath
from niphas_schemas.types import STORE_DIR

from .leftovers import remove_partial
from .metrics import IMPORT_BATCHES
from .store import NodeStore

log = logging.getLogger(__name__)


class ImportFailed(Exception):
    """A verified download Nix did not import; `disk_full` when the store's disk is full
    (retrying only downloads it again to fail the same way)."""

    def __init__(self, path: StorePath, cause: str) -> None:
        super().__init__(f"{path}: import failed: {cause}")
        self.disk_full = any(text in cause for text in DISK_FULL)


GATHER_IDLE_S = 5.0
"""Seconds without a byte landing after which a ready path stops waiting for the node's other
downloads (they wait for a busy or stalled holder: import what is here)."""
GATHER_MAX_S = 30.0
"""Seconds a ready path waits at most for the node's other downloads to land (one batch)."""
Quiet = Callable[[float, float], Awaitable[None]]
"""Returns once no download of the node is running, once none has landed bytes for the first
seconds given, or after the second."""
DISK_FULL = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))
"""What Nix's error says when the store's disk (or quota) is full."""


class Importer:
    def __init__(
        self, store: NodeStore, incoming: Path, quiet: Quiet | None = None, node: str = ""
    ) -> None:
        self.store = store
        self.node = node
        self.incoming = incoming
        self.quiet = quiet
        """Waits (at most the seconds given) until no download of this node is running."""
        (incoming / "nar").mkdir(parents=True, exist_ok=True)
        (incoming / "nix-cache-info").write_text(f"StoreDir: {STORE_DIR}\n")
        self._pending: list[tuple[NarInfo, asyncio.Future[None]]] = []
        self._running: asyncio.Task[None] | None = None

    def add(self, info: NarInfo) -> asyncio.Future[None]:
        """Import one downloaded path (its references must be valid already): queued at once,
        done when imported."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((info, future))
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._drain())
        return future

    async def _drain(self) -> None:
        while self._pending:
            await self._gather()
            batch, self._pending = self._pending, []
            IMPORT_BATCHES.labels(self.node).inc()
            errors = await self._import([info.store_path for info, _ in batch])
            for info, future in batch:
                self.discard(info)
                if future.done():
                    continue
                if info.store_path in self.store:
                    future.set_result(None)
                else:
                    cause = errors.get(info.store_path, "not valid after the import")
                    future.set_exception(ImportFailed(info.store_path, cause))

    async def _gather(self) -> None:
        """Wait while downloads are landing bytes (at most GATHER_MAX_S): they join the
        batch."""
        if self.quiet is not None:
            await self.quiet(GATHER_IDLE_S, GATHER_MAX_S)

    async def _import(self, paths: list[StorePath]) -> dict[StorePath, str]:
        """Import `paths`; the cause of each failure. A failed batch is retried one path at a
        time (each references only valid paths), so the paths that fit still become valid
        and each failure has its own cause."""
        try:
            await self.store.import_from(f"file://{self.incoming}", paths)
            return {}
        except NixError as exc:
            first = _cause(exc)
        await remove_partial(self.store, paths)
        if len(paths) == 1:
            return {paths[0]: first}
        errors = {}
        for path in paths:
            if path in self.store:
                continue
            try:
                await self.store.import_from(f"file://{self.incoming}", [path])
            except NixError as exc:
                errors[path] = _cause(exc)
                await remove_partial(self.store, [path])
        return errors

    def discard(self, info: NarInfo) -> None:
        """Remove a download from `incoming/` (imported, or no longer wanted)."""
        hash_part = info.store_path.hash_part
        for file in (
            self.incoming / f"{hash_part}.narinfo",
            self.incoming / "nar" / f"{hash_part}.nar",
        ):
            with contextlib.suppress(FileNotFoundError):
                file.unlink()


def _cause(exc: NixError) -> str:
    """Nix's own error line (`error: ...`), not the whole command line and log."""
    stderr = exc.stderr if isinstance(exc, CommandError) else str(exc)
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or [str(exc)])[-1]
