"""Answering `path.wanted`: make a closure present on this node, from peers first.

For each path of the wanted closure that the node lacks there is one *flight* (single-flight:
however many wants ask for a path, it is downloaded once; later wants join the flight). A
flight gets the verified narinfo from a holder, starts the flights of its references at once
(references are imported first), downloads the NAR from the same holder, then hands it to the
importer and announces it.

Which holder to try next is `holders.HolderChoice`'s call (peers first, then announced caches,
the want's own binary cache, fallback caches last,
byte ranges from several peers for a large NAR, an earlier fetching node before the cache);
`downloader.Downloader` gets and verifies the narinfo and NAR from that pick. A holder that
fails verification, stalls or errors is reported (log + metric) and the next one is tried. So
when many nodes want the same closure at once, the cache sends it about once and the followers
do not wait for the first node's import.

A full disk (Nix's import fails with ENOSPC) first gets one forced GC pass (`free_space`, the
collector, wired in `agent`) that leaves the closures of the wants being answered; if it freed
anything, or another want's pass did since this attempt began (two wants hitting the full disk
together: the second pass finds the first one's work done), the want is tried again at once;
otherwise it fails at once: another attempt would download again only to fail the same way.

A want may name the workload's own binary cache (`binary_cache`). Only a cache the node allows
(`workload_caches`, NIPHAS_MESH_WORKLOAD_CACHES) is used, and only with a public key the node
already trusts; otherwise the want fails at once with the reason, and nothing is asked of that
cache. An allowed cache joins the holders of each flight the want starts or joins, and of the
flights of their references; what it serves is verified like any holder's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence, Set
from datetime import UTC, datetime
from pathlib import Path

import aiohttp

from niphas_common.bus.consumer import Delivery
from niphas_common.nix.narinfo import NarInfo
from niphas_common.nix.signing import TrustedKeys
from niphas_common.nix.store_path import StorePath
from niphas_schemas import PathWanted

from .announcer import Announcer
from .download import Rejected
from .downloader import Downloader, OnNarinfo
from .holders import HolderChoice
from .importer import Importer, ImportFailed
from .index import HolderIndex
from .inflight import Inflight
from .last_use import LastUse
from .metrics import DOWNLOAD_RETRIES, FETCHES, SINGLE_FLIGHT_JOINS
from .store import NodeStore
from .workload_caches import WorkloadCaches

log = logging.getLogger(__name__)
RETRY_S = 2.0
"""Seconds between attempts at a want no holder could serve yet (bounded by its deadline)."""
MISSING_RETRY_S = 0.5
"""Seconds before asking again a node that announced it is fetching a path but has nothing
to serve of it yet."""


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
        workload_caches: WorkloadCaches | None = None,
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
        self.importer = Importer(store, incoming, self._downloads_landed, node=announcer.node)
        self.inflight = inflight
        self.fallback_caches = tuple(fallback_caches)
        self.workload_caches = workload_caches or WorkloadCaches((), trusted)
        self.peer_wait_s = peer_wait_s
        self.range_min_bytes = range_min_bytes
        self.free_space = free_space
        self.downloader = Downloader(
            node=announcer.node,
            trusted=trusted,
            session=session,
            inflight=inflight,
            incoming=incoming,
            concurrency=concurrency,
            range_bytes=range_bytes,
        )
        self._flights: dict[str, asyncio.Task[None]] = {}
        self._caches: dict[str, list[str]] = {}
        """Hash part -> the wants' own caches a running flight may also try (grows on joins)."""
        self._wanted: Counter[StorePath] = Counter()
        """Paths of the wants being answered right now (what `needed` starts from)."""
        self._references: dict[str, Sequence[StorePath]] = {}
        """Signed references of paths fetched but not valid yet (the store knows the rest)."""
        self._downloading = 0
        """Flights getting their narinfo and NAR right now (an import batch waits for them)."""
        self._download_ended = asyncio.Event()
        self._collected = 0
        """Paths forced GC passes have deleted so far (an attempt compares before and after)."""

    @property
    def node(self) -> str:
        return self.announcer.node

    @property
    def downloads(self) -> int:
        """NARs downloaded and verified (what single-flight keeps at one per path)."""
        return self.downloader.downloads

    async def close(self) -> None:
        for task in list(self._flights.values()):
            task.cancel()
        await self.downloader.close()

    # -- the consumer's handler --------------------------------------------------------

    async def handle_want(self, event: PathWanted, delivery: Delivery) -> None:
        if event.node != self.node:
            # The consumer takes path.wanted.<this node> only; a want naming another node in
            # its body was sent to the wrong subject: never fetched for.
            log.warning("ignoring a want for node %s sent to node %s", event.node, self.node)
            return
        paths = [StorePath.parse(p) for p in event.store_paths]
        for p in paths:
            self.last_use.touch(p.hash_part)
        refusal = self.workload_caches.refusal(event.binary_cache, event.binary_cache_public_key)
        if refusal is not None:
            log.warning("refusing a want of %s: %s", event.requester, refusal)
            for p in paths:
                if p not in self.store:
                    await self.announcer.failed(str(p), f"{event.requester}: {refusal}")
            return
        caches = (event.binary_cache,) if event.binary_cache else ()
        remaining = (event.deadline - datetime.now(UTC)).total_seconds()
        errors: dict[StorePath, str] = {}
        late = ""
        try:
            async with asyncio.timeout(remaining):
                await self.ensure(paths, errors, caches)
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

    async def ensure(
        self,
        paths: Sequence[StorePath],
        errors: dict[StorePath, str],
        caches: Sequence[str] = (),
    ) -> None:
        """Make the closure of `paths` present, retrying until the caller's deadline; the last
        error of each path is kept in `errors`. `caches`: the want's own (allowed) caches,
        tried after the announced holders and before the fallback caches. A full disk is
        retried only after a GC pass freed something (otherwise each attempt would download
        again only to fail the same way): FetchFailed at once."""
        self._wanted.update(paths)
        try:
            await self._ensure(paths, errors, caches)
        finally:
            self._wanted.subtract(paths)
            self._wanted = +self._wanted  # drop the zero counts
            if not self._wanted and not self._flights:
                self._references.clear()  # left by failed flights nobody waits for now

    async def _ensure(
        self, paths: Sequence[StorePath], errors: dict[StorePath, str], caches: Sequence[str]
    ) -> None:
        paths = self.fetch_order(paths)
        while True:
            collected = self._collected
            results = await asyncio.gather(
                *(asyncio.shield(self.flight(p, caches)) for p in paths), return_exceptions=True
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

    def fetch_order(self, paths: Sequence[StorePath]) -> list[StorePath]:
        """The order this node starts its flights in (and so takes download slots in): the
        paths with the fewest holders known (available or fetching) first, in random order
        among equals. Nodes wanting one closure at once then start on different paths and
        have different ones to give each other sooner (BitTorrent's rarest first), rather
        than all asking for the same path at the same moment."""
        order = list(paths)
        random.shuffle(order)
        order.sort(key=lambda p: len(self.index.holdings(str(p))))
        return order

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

    def flight(self, path: StorePath, caches: Sequence[str] = ()) -> asyncio.Future[None]:
        """The one fetch of `path` on this node (a finished future if present); `caches`
        (a want's own, already allowed) become holders of that flight, joined or new."""
        if path in self.store:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        task = self._flights.get(path.hash_part)
        if task is not None:
            SINGLE_FLIGHT_JOINS.labels(self.node).inc()
            live = self._caches[path.hash_part]
            live.extend(url for url in caches if url not in live)
            return task
        live = list(dict.fromkeys(caches))
        self._caches[path.hash_part] = live
        task = asyncio.create_task(self._fetch(path, live), name=f"fetch {path.base_name}")
        self._flights[path.hash_part] = task
        task.add_done_callback(lambda t: self._landed(path, t))
        return task

    def _landed(self, path: StorePath, task: asyncio.Task[None]) -> None:
        self._flights.pop(path.hash_part, None)
        self._caches.pop(path.hash_part, None)
        if path in self.store:
            self._references.pop(path.hash_part, None)
        if not task.cancelled() and task.exception() is not None:
            FETCHES.labels(self.node, "failed").inc()

    # -- one flight --------------------------------------------------------------------

    async def _fetch(self, path: StorePath, caches: Sequence[str]) -> None:
        refs: list[asyncio.Future[None]] = []
        # From now on a peer asking for this path waits for our verified narinfo (and NAR).
        self.inflight.begin(path.hash_part)

        def start_references(info: NarInfo) -> None:
            if not refs:
                self._references[path.hash_part] = info.reference_paths()
                order = self.fetch_order(info.reference_paths())
                refs.extend(self.flight(r, caches) for r in order)
                refs.append(_done())

        # Counted as downloading until handed to the importer (or waiting for references to
        # be imported, or failed): an import batch waits for the downloads still landing.
        self._downloading += 1
        counted = True

        def handed_over() -> None:
            nonlocal counted
            if counted:
                counted = False
                self._downloading -= 1
                self._download_ended.set()  # wake the importer's wait; it looks again
                self._download_ended = asyncio.Event()

        try:
            info = await self._download(path, start_references, caches)
            if not all(r.done() for r in refs):
                handed_over()
            try:
                await asyncio.gather(*refs)
            except BaseException:
                self.importer.discard(info)
                raise
            added = self.importer.add(info)
            handed_over()
            await added
        finally:
            handed_over()
            self.inflight.end(path.hash_part)
        FETCHES.labels(self.node, "imported").inc()
        self.last_use.touch(path.hash_part)
        valid = self.store.lookup(path.hash_part)
        if valid is not None:
            await self.announcer.available(valid)

    async def _downloads_landed(self, idle: float, most: float) -> None:
        """Return once no flight is downloading, once none has landed a byte for `idle`
        seconds (waiting for a busy peer, a stalled holder), or after `most` seconds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(most):
                while self._downloading:
                    ended = asyncio.ensure_future(self._download_ended.wait())
                    landed = asyncio.ensure_future(self.inflight.landed())
                    done, _ = await asyncio.wait((ended, landed), timeout=idle,
                                                 return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                    ended.cancel()
                    landed.cancel()
                    if not done:
                        return

    async def _download(
        self, path: StorePath, on_narinfo: OnNarinfo, caches: Sequence[str]
    ) -> NarInfo:
        choice = HolderChoice(
            self.index,
            str(path),
            node=self.node,
            url=self.announcer.url,
            announce_fetching=lambda: self.announcer.fetching(str(path)),
            workload_caches=caches,
            fallback_caches=self.fallback_caches,
            peer_wait_s=self.peer_wait_s,
            range_min_bytes=self.range_min_bytes,
            load=self.downloader.load,
        )
        errors: list[str] = []
        while pick := await choice.next():
            if len(pick) > 1:  # a large NAR several peers hold: byte ranges from all at once
                try:
                    return await self.downloader.from_peers(pick, path, on_narinfo)
                except Rejected as exc:
                    errors.append(str(exc))
                continue
            holder = pick[0]
            try:
                return await self.downloader.from_holder(holder, path, on_narinfo)
            except Rejected as exc:
                if exc.reason == "busy":
                    # It uploads all it takes at once: others first, then it again when free
                    # (the choice waits for a free peer rather than go to the cache).
                    DOWNLOAD_RETRIES.labels(self.node, "busy").inc()
                    choice.again(holder)
                    continue
                if exc.reason == "missing" and holder.state == "fetching":
                    # Its flight has no narinfo yet (or just ended): ask again shortly.
                    DOWNLOAD_RETRIES.labels(self.node, "missing").inc()
                    choice.again(holder)
                    await asyncio.sleep(MISSING_RETRY_S)
                    continue
                errors.append(str(exc))
                self.downloader.reject(holder, path, exc)
        raise FetchFailed(f"{path}: {'; '.join(errors) or 'no holder announced it'}")


def _done() -> asyncio.Future[None]:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future
