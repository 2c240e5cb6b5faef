"""One large NAR in byte ranges from several peers at once, verified over the whole.

Above `range_min_bytes`, when at least two peers hold a path, the NAR is cut into ranges of
`range_bytes`; every peer runs a worker that takes the next range nobody has, fetches it with
`Range: bytes=a-b` and writes it at its offset in the partial file (memory stays at one buffer
per worker). A verifier follows the completed prefix in order, feeding NarHash/NarSize and the
NAR parser exactly as a single stream would, and advances the partial download (peers can
stream it from this node meanwhile). A peer that errors, answers the wrong range or stalls is
reported and dropped; its range goes back to the others.

A range has no signed hash of its own, so a peer that corrupts one is only caught by NarHash at
the end. Then the copy is completed from one peer at a time: every range that peer did not
serve is fetched from it again and compared with what landed; if that peer's copy verifies,
the peers whose ranges differed are reported (reason `hash`) and its copy is used; if not, it
is reported itself and the next peer is tried. Nothing is imported that did not verify.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from niphas_common.nix.errors import NarError, VerificationError
from niphas_common.nix.hashes import NarVerifier
from niphas_common.nix.nar_parser import NarLimits, NarParser, NullSink
from niphas_common.nix.narinfo import NarInfo

from .download import FLUSH_BYTES, Rejected
from .index import Holding
from .inflight import Partial
from .peer_load import BUSY_S

Report = Callable[[Holding, Rejected], None]


@dataclass(frozen=True, eq=False)
class Source:
    """A peer and the URL of the NAR there (from its own verified narinfo)."""

    holding: Holding
    nar_url: str


class RangedDownload:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        info: NarInfo,
        sources: list[Source],
        tmp: Path,
        partial: Partial,
        range_bytes: int,
        report: Report,
    ) -> None:
        self.session = session
        self.info = info
        self.sources = sources
        self.tmp = tmp
        self.partial = partial
        self.report = report
        size = info.nar_size
        self.ranges = [(a, min(a + range_bytes, size)) for a in range(0, size, range_bytes)]
        self.owner: list[Source | None] = [None] * len(self.ranges)
        self._pending = deque(range(len(self.ranges)))
        self._alive = set(sources)
        self._changed = asyncio.Event()
        self._fd = -1

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def run(self) -> None:
        """Leave the verified NAR in `tmp`, or raise Rejected (bad peers already reported)."""
        self._fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(self._fd, self.info.nar_size)
            self.partial.writing(self.tmp, self.info)
            workers = [asyncio.create_task(self._worker(s)) for s in self.sources]
            try:
                good = await self._verify_in_order()
            finally:
                for w in workers:
                    w.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
            if not good:
                self.partial.fail()  # peers streaming it from us must not wait for a repair
                await self._attribute()
        finally:
            os.close(self._fd)

    # -- fetching ranges ---------------------------------------------------------------

    async def _worker(self, source: Source) -> None:
        while any(o is None for o in self.owner):
            if not self._pending:
                await self._changed.wait()
                continue
            i = self._pending.popleft()
            try:
                await self._fetch(source, i)
            except Rejected as exc:
                if exc.reason != "busy":
                    self._drop(source, i, exc)
                    return
                # It uploads to all the peers it takes (`upload_slots`): the range goes back
                # to the others, and this peer is asked again shortly.
                self._pending.appendleft(i)
                self._wake()
                await asyncio.sleep(BUSY_S)
                continue
            except Exception as exc:
                self._drop(source, i, exc)
                return
            self.owner[i] = source
            self._wake()

    def _drop(self, source: Source, i: int, exc: Exception) -> None:
        """`source` failed range `i`: it goes back to the others; `source` is reported."""
        self._pending.appendleft(i)
        self._alive.discard(source)
        if not isinstance(exc, Rejected):
            exc = Rejected(source.holding.url, "error", repr(exc))
        self.report(source.holding, exc)
        self._wake()

    async def _fetch(self, source: Source, i: int, compare: bool = False) -> bool:
        """Write range `i` from `source`; with `compare`, whether it differed from before."""
        a, b = self.ranges[i]
        url = f"{source.holding.url}/{source.nar_url}"
        differs = False
        at = a
        try:
            async with self.session.get(url, headers={"Range": f"bytes={a}-{b - 1}"}) as resp:
                expected = f"bytes {a}-{b - 1}/{self.info.nar_size}"
                if resp.status == 503:
                    raise Rejected(url, "busy", f"range {a}-{b - 1}: HTTP 503")
                if resp.status != 206 or resp.headers.get("Content-Range") != expected:
                    raise Rejected(url, "error", f"asked for {expected}, got HTTP {resp.status}")
                buf = bytearray()
                async for chunk in resp.content.iter_chunked(FLUSH_BYTES):
                    if at + len(buf) + len(chunk) > b:
                        raise Rejected(url, "error", f"range {a}-{b - 1} runs long")
                    buf += chunk
                    if len(buf) >= FLUSH_BYTES:
                        differs |= await asyncio.to_thread(self._put, bytes(buf), at, compare)
                        at += len(buf)
                        buf.clear()
                differs |= await asyncio.to_thread(self._put, bytes(buf), at, compare)
                at += len(buf)
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = "stall" if isinstance(exc, TimeoutError) else "error"
            raise Rejected(url, reason, f"range {a}-{b - 1}: {exc!r}") from exc
        if at != b:
            raise Rejected(url, "error", f"range {a}-{b - 1} ended at {at}")
        return differs

    def _put(self, data: bytes, at: int, compare: bool) -> bool:
        differs = compare and os.pread(self._fd, len(data), at) != data
        os.pwrite(self._fd, data, at)
        return differs

    # -- verifying -----------------------------------------------------------------------

    async def _verify_in_order(self) -> bool:
        """Follow the completed prefix; False when the whole is not the signed NAR."""
        check = _Check(self.info)
        for i, (a, b) in enumerate(self.ranges):
            while self.owner[i] is None:
                if not self._alive:
                    raise Rejected("peers", "error", f"no peer could serve bytes {a}-{b - 1}")
                await self._changed.wait()
            if not await asyncio.to_thread(check.feed, self._fd, a, b):
                return False
            self.partial.advance(b - a)
        return check.finish()

    async def _attribute(self) -> None:
        """The ranges made a bad copy: complete it from one peer at a time (see above)."""
        for source in [s for s in self.sources if s in self._alive]:
            suspects: set[Source] = set()
            try:
                for i, owner in enumerate(self.owner):
                    if owner is not source and await self._fetch(source, i, compare=True):
                        suspects.add(owner or source)
                    self.owner[i] = source
            except Rejected as exc:
                self.report(source.holding, exc)
                continue
            check = _Check(self.info)
            if await asyncio.to_thread(check.feed, self._fd, 0, self.info.nar_size) and (
                check.finish()
            ):
                for bad in suspects - {source}:
                    self.report(
                        bad.holding,
                        Rejected(bad.holding.url, "hash", "its ranges differ from a verified copy"),
                    )
                return
            self.report(
                source.holding,
                Rejected(source.holding.url, "hash", "its whole copy does not match NarHash"),
            )
        raise Rejected("peers", "hash", f"{self.info.store_path}: no peer's copy matches NarHash")


class _Check:
    """NarHash/NarSize and the NAR grammar over bytes read back in order."""

    def __init__(self, info: NarInfo) -> None:
        self.verifier = NarVerifier(info.nar_hash, info.nar_size, str(info.store_path))
        self.parser = NarParser(NullSink(), NarLimits(max_nar_size=info.nar_size))

    def feed(self, fd: int, a: int, b: int) -> bool:
        try:
            while a < b:
                data = os.pread(fd, min(FLUSH_BYTES, b - a), a)
                if not data:
                    return False
                self.verifier.update(data)
                self.parser.feed(data)
                a += len(data)
        except (VerificationError, NarError):
            return False
        return True

    def finish(self) -> bool:
        try:
            self.parser.finish()
            self.verifier.finish()
        except (VerificationError, NarError):
            return False
        return True
