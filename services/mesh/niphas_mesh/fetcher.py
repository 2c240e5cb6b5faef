"""Answering `path.wanted`: make a closure present on this node, from peers first.

For each path of the wanted closure that the node lacks there is one *flight* (single-flight:
however many wants ask for a path, it is downloaded once; later wants join the flight). A
flight gets the verified narinfo from a holder, starts the flights of its references at once
(references are imported first), downloads the NAR from the same holder, then hands it to the
importer and announces it.

Holders come from the index: peers first (shuffled, so one seed does not serve everyone), the
cache last, plus the configured fallback caches; a large NAR that several peers hold comes in
byte ranges from all of them (`ranges`). A holder that fails verification, stalls or errors is
reported (log + metric) and the next one is tried. When no peer has a path yet, the node
announces `fetching`; if other nodes announced their fetch earlier, it streams the path from
one of them while that node is still receiving it (`inflight`), otherwise it goes to the
cache. So when many nodes want the same closure at once, the cache sends it about once and the
followers do not wait for the first node's import.

A full disk (Nix's import fails with ENOSPC) first gets one forced GC pass (`free_space`, the
collector, wired in `agent`) that leaves the closures of the wants being answered; if it freed
anything, or another want's pass did since this attempt began (two wants hitting the full disk
together: the second pass finds the first one's work done), the want is tried again at once;
otherwise it fails at once: another attempt would download again only to fail the same way.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence, Set
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp

from niphas_common.bus.consumer import Delivery
from niphas_common.nix.cache_client import BinaryCacheClient
from niphas_common.nix.narinfo import NarInfo
from niphas_common.nix.signing import TrustedKeys
from niphas_common.nix.store_path import StorePath
from niphas_schemas import PathWanted

from .announcer import Announcer
from .download import Rejected, fetch_nar, fetch_narinfo, land, partial_file
from .importer import Importer, ImportFailed
from .index import HolderIndex, Holding
from .inflight import Inflight
from .last_use import LastUse
from .metrics import FETCHED_BYTES, FETCHES, REJECTED, SINGLE_FLIGHT_JOINS
from .ranges import RangedDownload, Source
from .store import NodeStore

log = logging.getLogger(__name__)
RETRY_S = 2.0
"""Seconds between attempts at a want no holder could serve yet (bounded by its deadline)."""
MISSING_RETRY_S = 0.5
"""Seconds before asking again a node that announced it is fetching a path but has nothing
to serve of it yet."""
MAX_RANGE_PEERS = 8
"""Peers one NAR is fetched from at once in ranges."""


FreeSpace = Callable[[Set[str]], Awaitable[Sequence[object]]]
"""One forced GC pass leaving the given hash parts; returns what it deleted."""


class FetchFailed(Exception):
    pass


class Fetcher:
    def __init__(
        self,
        *,
        store: NodeStore,
        index: HolderIndex,
        announcer: Announcer,
        last_use: LastUse,
        incoming: Path,
        trusted: TrustedKeys,
        session: aiohttp.ClientSession,
        inflight: Inflight,
        fallback_caches: Sequence[str] = (),
        concurrency: int = 8,
        peer_wait_s: float = 30.0,
        range_min_bytes: int = 64 << 20,
        range_bytes: int = 16 << 20,
        free_space: FreeSpace | None = None,
    ) -> None:
        self.store = store
        self.index = index
        self.announcer = announcer
        self.last_use = last_use
        self.importer = Importer(store, incoming)
        self.incoming = incoming
        self.trusted = trusted
        self.session = session
        self.inflight = inflight
        self.fallback_caches = tuple(fallback_caches)
        self.peer_wait_s = peer_wait_s
        self.range_min_bytes = range_min_bytes
        self.range_bytes = range_bytes
        self.free_space = free_space
        self._limit = asyncio.Semaphore(concurrency)
        self._flights: dict[str, asyncio.Task[None]] = {}
        self._clients: dict[str, BinaryCacheClient] = {}
        self._wanted: Counter[StorePath] = Counter()
        """Paths of the wants being answered right now (what `needed` starts from)."""
        self._references: dict[str, Sequence[StorePath]] = {}
        """Signed references of paths fetched but not valid yet (the store knows the rest)."""
        self.downloads = 0
        """NARs downloaded and verified (what single-flight keeps at one per path)."""
        self._collected = 0
        """Paths forced GC passes have deleted so far (an attempt compares before and after)."""

    @property
    def node(self) -> str:
        return self.announcer.node

    async def close(self) -> None:
        for task in list(self._flights.values()):
            task.cancel()
        for client in self._clients.values():
            await client.close()

    # -- the consumer's handler --------------------------------------------------------

    async def handle_want(self, event: PathWanted, delivery: Delivery) -> None:
        if event.node != self.node:
            return  # another node's want: every node's consumer sees (and acks) them all
        paths = [StorePath.parse(p) for p in event.store_paths]
        for p in paths:
            self.last_use.touch(p.hash_part)
        remaining = (event.deadline - datetime.now(UTC)).total_seconds()
        errors: dict[StorePath, str] = {}
        late = ""
        try:
            async with asyncio.timeout(remaining):
                await self.ensure(paths, errors)
        except TimeoutError:
            late = f"not present by the deadline {event.deadline.isoformat()}"
        except FetchFailed:
            pass  # the cause of each path's failure is in `errors`
        for p in paths:
            if p in self.store:
                continue
            cause = errors.get(p)
            if late:  # the last attempt's cause, so the event says why, not only when
                cause = f"{late} (last error: {cause})" if cause else late
            await self.announcer.failed(str(p), f"{event.requester}: {cause or 'not present'}")

    async def ensure(self, paths: Sequence[StorePath], errors: dict[StorePath, str]) -> None:
        """Make the closure of `paths` present, retrying until the caller's deadline; the last
        error of each path is kept in `errors`. A full disk is retried only after a GC pass
        freed something (otherwise each attempt would download again only to fail the same
        way): FetchFailed at once."""
        self._wanted.update(paths)
        try:
            await self._ensure(paths, errors)
        finally:
            self._wanted.subtract(paths)
            self._wanted = +self._wanted  # drop the zero counts
            if not self._wanted and not self._flights:
                self._references.clear()  # left by failed flights nobody waits for now

    async def _ensure(self, paths: Sequence[StorePath], errors: dict[StorePath, str]) -> None:
        while True:
            collected = self._collected
            results = await asyncio.gather(
                *(asyncio.shield(self.flight(p)) for p in paths), return_exceptions=True
            )
            failed: dict[StorePath, FetchFailed | ImportFailed] = {}
            for p, result in zip(paths, results, strict=True):
                if isinstance(result, FetchFailed | ImportFailed):
                    failed[p] = result
                elif isinstance(result, BaseException):
                    raise result
            errors.clear()
            errors.update((p, str(exc)) for p, exc in failed.items())
            if not failed:
                return
            if any(isinstance(exc, ImportFailed) and exc.disk_full for exc in failed.values()):
                if not await self._collect_garbage() and self._collected == collected:
                    raise FetchFailed("; ".join(errors.values()))
                log.info("retrying %s: GC made room", [str(p) for p in failed])
                continue
            log.info("retrying %s in %.0fs: %s", [str(p) for p in failed], RETRY_S, errors)
            await self.index.changed(RETRY_S)

    async def _collect_garbage(self) -> bool:
        """One forced GC pass after an import failed on a full disk; whether it freed any
        path. It leaves the closures of every want being answered (this one included)."""
        if self.free_space is None:
            return False
        deleted = await self.free_space(self.needed())
        self._collected += len(deleted)
        return len(deleted) > 0

    def needed(self) -> set[str]:
        """Hash parts of the closures of the wants being answered: valid paths by their
        references in the store, paths still missing by their signed narinfo's."""
        return self.store.closure((p.hash_part for p in self._wanted), self._references)

    def fetching(self, path: str) -> bool:
        """Whether this node has a flight for `path` right now."""
        return StorePath.parse(path).hash_part in self._flights

    def flight(self, path: StorePath) -> asyncio.Future[None]:
        """The one fetch of `path` on this node (a finished future if present)."""
        if path in self.store:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        task = self._flights.get(path.hash_part)
        if task is not None:
            SINGLE_FLIGHT_JOINS.labels(self.node).inc()
            return task
        task = asyncio.create_task(self._fetch(path), name=f"fetch {path.base_name}")
        self._flights[path.hash_part] = task
        task.add_done_callback(lambda t: self._landed(path, t))
        return task

    def _landed(self, path: StorePath, task: asyncio.Task[None]) -> None:
        self._flights.pop(path.hash_part, None)
        if path in self.store:
            self._references.pop(path.hash_part, None)
        if not task.cancelled() and task.exception() is not None:
            FETCHES.labels(self.node, "failed").inc()

    # -- one flight --------------------------------------------------------------------

    async def _fetch(self, path: StorePath) -> None:
        refs: list[asyncio.Future[None]] = []
        # From now on a peer asking for this path waits for our verified narinfo (and NAR).
        self.inflight.begin(path.hash_part)

        def start_references(info: NarInfo) -> None:
            if not refs:
                self._references[path.hash_part] = info.reference_paths()
                refs.extend(self.flight(r) for r in info.reference_paths())
                refs.append(_done())

        try:
            info = await self._download(path, start_references)
            try:
                await asyncio.gather(*refs)
            except BaseException:
                self.importer.discard(info)
                raise
            await self.importer.add(info)
        finally:
            self.inflight.end(path.hash_part)
        FETCHES.labels(self.node, "imported").inc()
        self.last_use.touch(path.hash_part)
        valid = self.store.lookup(path.hash_part)
        if valid is not None:
            await self.announcer.available(valid)

    async def _download(self, path: StorePath, on_narinfo: Callable[[NarInfo], None]) -> NarInfo:
        loop = asyncio.get_running_loop()
        started = loop.time()
        since = datetime.now(UTC) - timedelta(seconds=self.peer_wait_s)
        tried: set[tuple[str, str]] = set()  # (url, state): a fetching peer may come back
        mine: int | None = None
        errors: list[str] = []
        while True:
            holders = [h for h in self._holders(str(path)) if (h.url, h.state) not in tried]
            if not any(h.kind == "node" for h in holders):
                # No peer has it yet: announce our fetch; stream from a node that announced
                # its own fetch earlier (never a later one: no cycles), else go to the cache.
                if mine is None:
                    mine = await self.announcer.fetching(str(path))
                    await self.index.reached(mine, 5.0)
                ahead = [
                    h for h in self.index.fetchers(str(path), since, before=mine) if not self._me(h)
                ]
                fresh = [h for h in ahead if (h.url, h.state) not in tried]
                waited = loop.time() - started
                if ahead and waited < self.peer_wait_s:
                    if not fresh:
                        await self.index.changed(min(RETRY_S, self.peer_wait_s - waited))
                        continue
                    holders = [random.choice(fresh)]
            if not holders:
                detail = "; ".join(errors) or "no holder announced it"
                raise FetchFailed(f"{path}: {detail}")
            holder = holders[0]
            peers = [h for h in holders if h.kind == "node" and h.state == "available"]
            if len(peers) >= 2 and (peers[0].nar_size or 0) >= self.range_min_bytes:
                # A large NAR several peers hold: byte ranges from all of them at once.
                peers = peers[:MAX_RANGE_PEERS]
                tried.update((h.url, h.state) for h in peers)
                try:
                    return await self._from_peers(peers, path, on_narinfo)
                except Rejected as exc:
                    errors.append(str(exc))
                continue
            tried.add((holder.url, holder.state))
            try:
                return await self._from(holder, path, on_narinfo)
            except Rejected as exc:
                if exc.reason == "missing" and holder.state == "fetching":
                    # Its flight has no narinfo yet (or just ended): ask again shortly.
                    tried.discard((holder.url, holder.state))
                    await asyncio.sleep(MISSING_RETRY_S)
                    continue
                errors.append(str(exc))
                self._reject(holder, path, exc)

    def _reject(self, holder: Holding, path: StorePath, exc: Rejected) -> None:
        if exc.reason != "missing":
            REJECTED.labels(self.node, holder.holder, exc.reason).inc()
            log.warning("rejected %s from %s (%s): %s", path, holder.url, exc.reason, exc.detail)

    def _me(self, holder: Holding) -> bool:
        """This node, at its URL or at an earlier run's (a restarted agent may listen on
        another port or pod IP; what that run announced is stale, never worth waiting for)."""
        return holder.url == self.announcer.url or (
            holder.kind == "node" and holder.holder == self.node
        )

    def _holders(self, path: str) -> list[Holding]:
        found = [h for h in self.index.available(path) if not self._me(h)]
        known = {h.url for h in found}
        epoch = datetime.fromtimestamp(0, UTC)
        found += [
            Holding("cache", url, url, "available", 0, epoch)
            for url in self.fallback_caches
            if url not in known
        ]
        return found

    async def _from(
        self, holder: Holding, path: StorePath, on_narinfo: Callable[[NarInfo], None]
    ) -> NarInfo:
        client = self._client(holder.url)
        partial = self.inflight.begin(path.hash_part)  # begun with the flight; here: found
        async with self._limit:
            info = await fetch_narinfo(client, path)
            on_narinfo(info)
            partial.known(info)
            size = await fetch_nar(client, info, self.incoming, partial)
        self.downloads += 1
        FETCHED_BYTES.labels(self.node, holder.kind).inc(size)
        return info

    async def _from_peers(
        self, peers: list[Holding], path: StorePath, on_narinfo: Callable[[NarInfo], None]
    ) -> NarInfo:
        partial = self.inflight.begin(path.hash_part)
        async with self._limit:
            found = await asyncio.gather(
                *(fetch_narinfo(self._client(h.url), path) for h in peers), return_exceptions=True
            )
            info: NarInfo | None = None
            sources = []
            for holder, got in zip(peers, found, strict=True):
                if isinstance(got, Rejected):
                    self._reject(holder, path, got)
                elif isinstance(got, BaseException):
                    raise got
                elif got.compression == "none":  # all signed: the same NarHash and NarSize
                    info = info or got
                    sources.append(Source(holder, got.url))
            if info is None:
                raise Rejected("peers", "missing", f"no peer serves {path} uncompressed")
            on_narinfo(info)
            partial.known(info)
            tmp = partial_file(info, self.incoming)
            download = RangedDownload(
                self.session,
                info,
                sources,
                tmp,
                partial,
                self.range_bytes,
                lambda holder, exc: self._reject(holder, path, exc),
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

    def _client(self, url: str) -> BinaryCacheClient:
        client = self._clients.get(url)
        if client is None:
            client = BinaryCacheClient(url, self.trusted, session=self.session)
            self._clients[url] = client
        return client


def _done() -> asyncio.Future[None]:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future
