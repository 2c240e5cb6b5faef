"""Importing verified downloads into the node's store, several paths per `nix copy`.

Downloads land in `incoming/`, a file:// binary cache (narinfo + uncompressed NAR). Paths whose
references are already valid are imported with `nix copy --no-recursive --from file://incoming`:
Nix checks the builder's signature and the NarHash once more, restores the tree and registers it
valid with its references and signatures, so `nix path-info` and `nix store verify` see an
ordinary substituted path. Paths that become ready while a copy runs are batched into the next
one (one Nix process start per batch rather than per path).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from niphas_common.nix.errors import NixError
from niphas_common.nix.narinfo import NarInfo
from niphas_schemas.types import STORE_DIR

from .store import NodeStore

log = logging.getLogger(__name__)


class ImportFailed(Exception):
    pass


class Importer:
    def __init__(self, store: NodeStore, incoming: Path) -> None:
        self.store = store
        self.incoming = incoming
        (incoming / "nar").mkdir(parents=True, exist_ok=True)
        (incoming / "nix-cache-info").write_text(f"StoreDir: {STORE_DIR}\n")
        self._pending: list[tuple[NarInfo, asyncio.Future[None]]] = []
        self._running: asyncio.Task[None] | None = None

    async def add(self, info: NarInfo) -> None:
        """Import one downloaded path (its references must be valid already)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((info, future))
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._drain())
        await future

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            paths = [info.store_path for info, _ in batch]
            try:
                await self.store.import_from(f"file://{self.incoming}", paths)
                error = None
            except NixError as exc:
                error = str(exc)
            for info, future in batch:
                self.discard(info)
                if future.done():
                    continue
                if info.store_path in self.store:
                    future.set_result(None)
                else:
                    future.set_exception(
                        ImportFailed(f"{info.store_path}: import failed: {error or 'not valid'}")
                    )

    def discard(self, info: NarInfo) -> None:
        """Remove a download from `incoming/` (imported, or no longer wanted)."""
        hash_part = info.store_path.hash_part
        for file in (
            self.incoming / f"{hash_part}.narinfo",
            self.incoming / "nar" / f"{hash_part}.nar",
        ):
            with contextlib.suppress(FileNotFoundError):
                file.unlink()
