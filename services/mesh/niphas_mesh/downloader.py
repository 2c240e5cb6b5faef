"""Downloading one path's narinfo and NAR from a pick of holders, verified.

From one holder: its narinfo (signature checked), then its NAR (hash checked) into the
incoming directory, fed to `inflight` as it arrives so peers can stream it from this node
meanwhile. From several peers: the narinfo from each, then byte ranges of the uncompressed
NAR from all of them at once (`ranges`). A holder that fails verification, stalls or errors
raises `Rejected`; `reject` reports it (log + metric).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import aiohttp

from niphas_common.nix.cache_client import BinaryCacheClient
from niphas_common.nix.narinfo import NarInfo
from niphas_common.nix.signing import TrustedKeys
from niphas_common.nix.store_path import StorePath

from .download import Rejected, fetch_nar, fetch_narinfo, land, partial_file
from .index import Holding
from .inflight import Inflight
from .metrics import FETCHED_BYTES, REJECTED
from .peer_load import PeerLoad
from .ranges import RangedDownload, Source
from .upload_slots import PEER_HEADER

log = logging.getLogger(__name__)

OnNarinfo = Callable[[NarInfo], None]
"""Called once the verified narinfo is known, before the NAR arrives."""


class Downloader:
    def __init__(
        self,
        *,
        node: str,
        trusted: TrustedKeys,
        session: aiohttp.ClientSession,
        inflight: Inflight,
        incoming: Path,
        concurrency: int = 8,
        range_bytes: int = 16 << 20,
    ) -> None:
        self.node = node
        self.trusted = trusted
        self.session = session
        # Holders count uploads per peer by this name (`upload_slots`).
        session.headers[PEER_HEADER] = node
        self.inflight = inflight
        self.incoming = incoming
        self.range_bytes = range_bytes
        self._limit = asyncio.Semaphore(concurrency)
        self.load = PeerLoad()
        """This node's downloads from each holder, and the holders that said busy."""
        self._clients: dict[str, BinaryCacheClient] = {}
        self.downloads = 0
        """NARs downloaded and verified (what single-flight keeps at one per path)."""

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()

    def reject(self, holder: Holding, path: StorePath, exc: Rejected) -> None:
        if exc.reason not in ("missing", "busy"):
            REJECTED.labels(self.node, holder.holder, exc.reason).inc()
            log.warning("rejected %s from %s (%s): %s", path, holder.url, exc.reason, exc.detail)

    async def from_holder(self, holder: Holding, path: StorePath, on_narinfo: OnNarinfo) -> NarInfo:
        client = self._client(holder.url)
        partial = self.inflight.begin(path.hash_part)  # begun with the flight; here: found
        async with self._limit:
            info = await fetch_narinfo(client, path)
            on_narinfo(info)
            with self.load.download(holder.url):
                try:
                    size = await fetch_nar(client, info, self.incoming, partial)
                except Rejected as exc:
                    if exc.reason == "busy":
                        self.load.busy(holder.url)
                    raise
        self.downloads += 1
        FETCHED_BYTES.labels(self.node, holder.kind).inc(size)
        return info

    async def from_peers(
        self, peers: list[Holding], path: StorePath, on_narinfo: OnNarinfo
    ) -> NarInfo:
        partial = self.inflight.begin(path.hash_part)
        async with self._limit:
            info, sources = await self._narinfos(peers, path)
            on_narinfo(info)
            tmp = partial_file(info, self.incoming)
            download = RangedDownload(
                self.session,
                info,
                sources,
                tmp,
                partial,
                self.range_bytes,
                lambda holder, exc: self.reject(holder, path, exc),
            )
            try:
                await download.run()
                land(info, self.incoming, tmp, partial)
            except BaseException:
                partial.fail()
                raise
            finally:
                tmp.unlink(missing_ok=True)
        self.downloads += 1
        FETCHED_BYTES.labels(self.node, "node").inc(info.nar_size)
        return info

    async def _narinfos(
        self, peers: list[Holding], path: StorePath
    ) -> tuple[NarInfo, list[Source]]:
        """The verified narinfo and the peers serving the NAR uncompressed."""
        found = await asyncio.gather(
            *(fetch_narinfo(self._client(h.url), path) for h in peers), return_exceptions=True
        )
        info: NarInfo | None = None
        sources = []
        for holder, got in zip(peers, found, strict=True):
            if isinstance(got, Rejected):
                self.reject(holder, path, got)
            elif isinstance(got, BaseException):
                raise got
            elif got.compression == "none":  # all signed: the same NarHash and NarSize
                info = info or got
                sources.append(Source(holder, got.url))
        if info is None:
            raise Rejected("peers", "missing", f"no peer serves {path} uncompressed")
        return info, sources

    def _client(self, url: str) -> BinaryCacheClient:
        client = self._clients.get(url)
        if client is None:
            client = BinaryCacheClient(url, self.trusted, session=self.session)
            self._clients[url] = client
        return client
