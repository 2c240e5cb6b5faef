"""NARs this node is downloading right now, served to peers while they arrive.

A node that is fetching a path from the cache (or from another peer) announces `fetching`;
followers may download that path from it before it has finished: the verified narinfo is
served as soon as the node has it, and the NAR bytes written so far are streamed, the rest
following as they land (byte ranges too). The follower verifies the signature, NarHash and
NarSize itself, exactly as for any holder: if the upstream copy turns out bad, this node
aborts every stream of it, and a follower that got all the bytes would see the mismatch anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from niphas_common.nix.narinfo import NarInfo

from .upload_slots import DEFAULT_LIMIT, UploadSlots


@dataclass(eq=False)
class Partial:
    """One NAR on its way in: its verified narinfo, the file it is written to, bytes so far."""

    hash_part: str
    info: NarInfo | None = None
    file: Path | None = None
    written: int = 0
    attempt: int = 0
    """Bumped for every download started: a stream serves the bytes of one attempt only."""
    failed: bool = False
    readers: int = 0
    """Streams of it being served to peers (for metrics and tests)."""
    on_advance: Callable[[], None] | None = None
    """Told whenever bytes land (the node's importer waits while downloads progress)."""
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def writing(self, file: Path, info: NarInfo) -> None:
        """Bytes of `info`'s NAR start landing in `file`. Only now is the narinfo served: a
        peer given it before there was a file to stream would ask for the NAR and get 404."""
        self.info = info
        self.file = file
        self.written = 0
        self.attempt += 1
        self.failed = False
        self._wake()

    def advance(self, n: int) -> None:
        self.written += n
        self._wake()
        if self.on_advance is not None:
            self.on_advance()

    def moved(self, file: Path) -> None:
        self.file = file

    def fail(self) -> None:
        """The download from this holder went wrong: abort the streams, await a retry. Its
        narinfo and file are not offered again until the retry writes (its file is gone)."""
        self.failed = True
        self.info = None
        self.file = None
        self._wake()

    async def changed(self, timeout: float) -> None:  # noqa: ASYNC109 (a bounded wait)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), max(timeout, 0.0))


class Inflight:
    """hash part -> Partial, for every flight of this node that has not been imported yet;
    and the node's slots for NAR uploads to peers (`upload_slots`: the serving side reaches
    both through the cache view)."""

    def __init__(self, uploads: UploadSlots | None = None) -> None:
        self._partials: dict[str, Partial] = {}
        self.uploads = uploads or UploadSlots(DEFAULT_LIMIT)
        self._landed = asyncio.Event()

    def begin(self, hash_part: str) -> Partial:
        partial = self._partials.get(hash_part)
        if partial is None:
            partial = Partial(hash_part, on_advance=self._advanced)
            self._partials[hash_part] = partial
        return partial

    def _advanced(self) -> None:
        self._landed.set()
        self._landed = asyncio.Event()

    async def landed(self) -> None:
        """Return when bytes of any download of this node land next."""
        await self._landed.wait()

    def get(self, hash_part: str) -> Partial | None:
        return self._partials.get(hash_part)

    def end(self, hash_part: str) -> None:
        partial = self._partials.pop(hash_part, None)
        if partial is not None:
            partial.fail()  # wakes readers still waiting for bytes that will not come
