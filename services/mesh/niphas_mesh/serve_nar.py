"""`/nar/<name>`: NAR downloads.

`<hash>.nar` (and `.nar.zst` when the node serves zstd) is streamed straight from the store path
through the NAR serialiser: nothing is stored twice and nothing is compressed unless asked for.
Uncompressed NARs have a known length (NarSize), so HEAD and single byte ranges are answered
exactly (a peer can fetch parts of one large NAR from several holders). A NAR the node is
fetching right now is streamed from its partial download, the rest following as it lands
(see `inflight`). Any other name is a file of the cache directory, served as a static file
(which handles Range and HEAD itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import zstandard
from aiohttp import web

from niphas_common.nix.nar import iter_nar
from niphas_common.nix.narinfo import NarInfo

from .cache_view import HASH_RE, CacheView
from .inflight import Partial
from .metrics import SERVED_BYTES
from .send_nar import blocking, send_file_range, send_whole_nar

_OWN_RE = re.compile(rf"^({HASH_RE})\.nar(\.zst)?$")
_CACHE_FILE_RE = re.compile(r"^[A-Za-z0-9+\-_=][A-Za-z0-9+\-._=]*$")
CHUNK = 4 << 20
"""Bytes per hand-off from the serialiser thread (fewer hops for closures of small files)."""
PARTIAL_IDLE_S = 60.0
"""Seconds a stream of a download in progress waits for new bytes before giving up."""


async def handle(request: web.BaseRequest, view: CacheView, name: str) -> web.StreamResponse:
    own = _OWN_RE.match(name)
    if own is not None:
        hash_part, zst = own.group(1), own.group(2) is not None
        partial = view.inflight.get(hash_part)
        if partial is not None and not zst:
            resp = await _stream_partial(request, view, partial)
            if resp is not None:
                return resp
        # (Checked after the partial: a flight ends once its path is valid in the store.)
        info = view.store.lookup(hash_part)
        if info is not None and view.store.is_signed(info) and zst == (view.compression == "zstd"):
            view.last_use.touch(info.path.hash_part)
            path = view.store.real_path(info.path)
            return await _stream(request, view, path, info.nar_size, zst)
    elif view.cache_dir is not None and _CACHE_FILE_RE.match(name):
        file = view.cache_dir / "nar" / name
        if file.is_file():
            SERVED_BYTES.labels(view.node, "cache").inc(file.stat().st_size)
            return web.FileResponse(file, headers={"Content-Type": "application/x-nix-nar"})
    raise web.HTTPNotFound(text="no such NAR\n")


def _ranged(request: web.BaseRequest, resp: web.StreamResponse, size: int) -> tuple[int, int]:
    """Honour a single byte range of an uncompressed NAR: set status and headers."""
    start, stop = 0, size
    resp.headers["Accept-Ranges"] = "bytes"
    try:
        wanted = request.http_range
    except ValueError:
        raise web.HTTPRequestRangeNotSatisfiable(
            headers={"Content-Range": f"bytes */{size}"}
        ) from None
    if wanted.start is not None or wanted.stop is not None:
        start, stop = _bounds(wanted, size)
        resp.set_status(206)
        resp.headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    resp.content_length = stop - start
    return start, stop


async def _stream(
    request: web.BaseRequest, view: CacheView, path: Path, size: int, zst: bool
) -> web.StreamResponse:
    start, stop = 0, size
    resp = web.StreamResponse(headers={"Content-Type": "application/x-nix-nar"})
    if not zst:
        start, stop = _ranged(request, resp, size)
    await resp.prepare(request)
    if request.method == "HEAD":
        return resp
    if not zst and (start, stop) == (0, size):
        whole = await send_whole_nar(request, path, size)
        if whole is not None:
            SERVED_BYTES.labels(view.node, "store").inc(whole)
            await resp.write_eof()
            return resp
    chunks = (
        _compressed(iter_nar(path, CHUNK)) if zst else _window(iter_nar(path, CHUNK), start, stop)
    )
    sent = 0
    while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
        await resp.write(chunk)
        sent += len(chunk)
    SERVED_BYTES.labels(view.node, "store").inc(sent)
    await resp.write_eof()
    return resp


class UpstreamFailed(Exception):
    """The download being streamed failed here: the peer's connection is cut short."""


async def _stream_partial(
    request: web.BaseRequest, view: CacheView, partial: Partial
) -> web.StreamResponse | None:
    """Stream a NAR this node is still downloading: bytes so far, then the rest as it lands.

    The peer verifies NarHash/NarSize itself; if our download fails, its stream is cut."""
    attempt, info = partial.attempt, partial.info
    f = None
    for _ in range(2):  # the file may be renamed from .partial to its final name meanwhile
        if partial.file is None or info is None:
            return None
        with contextlib.suppress(FileNotFoundError):
            f = open(partial.file, "rb")  # noqa: ASYNC230, SIM115 (instant; closed below)
            break
    if f is None or info is None:
        return None
    with f:
        resp = web.StreamResponse(headers={"Content-Type": "application/x-nix-nar"})
        start, stop = _ranged(request, resp, info.nar_size)
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("the client went away")
        partial.readers += 1
        sent = [0]
        try:
            async with blocking(request) as fd:

                async def send(pos: int, n: int) -> int:
                    if fd is not None:  # by sendfile from a sender thread
                        return await send_file_range(fd, f, pos, n)
                    return await _send_landed(resp, transport, f, pos, n)

                await _relay(partial, attempt, info, start, stop, send, sent)
        finally:
            partial.readers -= 1
            SERVED_BYTES.labels(view.node, "fetching").inc(sent[0])
        await resp.write_eof()
        return resp


async def _relay(
    partial: Partial,
    attempt: int,
    info: NarInfo,
    start: int,
    stop: int,
    send: Callable[[int, int], Awaitable[int]],
    sent: list[int],
) -> None:
    """Send bytes [start, stop) of a download as they land; `sent[0]` counts them."""
    pos = start
    idle = 0.0
    while pos < stop:
        if partial.attempt != attempt or (partial.failed and pos >= partial.written):
            raise UpstreamFailed(f"{info.store_path}: the download from upstream failed")
        if pos < partial.written:
            n = await send(pos, min(partial.written, stop) - pos)
            pos += n
            sent[0] += n
            idle = 0.0
        elif idle >= PARTIAL_IDLE_S:
            raise UpstreamFailed(f"{info.store_path}: no progress upstream")
        else:
            await partial.changed(1.0)
            idle += 1.0


async def _send_landed(
    resp: web.StreamResponse, transport: asyncio.Transport, f: BinaryIO, pos: int, n: int
) -> int:
    """Send up to `n` bytes of `f` from `pos` (bytes that have landed); how many went out.

    By sendfile, straight from the page cache, where the event loop has it (asyncio's);
    uvloop has no `loop.sendfile`: there the bytes are read in a thread and written."""
    try:
        return await asyncio.get_running_loop().sendfile(transport, f, pos, n)
    except NotImplementedError:
        chunk = await asyncio.to_thread(os.pread, f.fileno(), min(n, CHUNK), pos)
        if not chunk:
            raise UpstreamFailed(f"{f.name}: shorter than the bytes counted as landed") from None
        await resp.write(chunk)
        return len(chunk)


def _bounds(wanted: slice, size: int) -> tuple[int, int]:
    start, stop = wanted.start, wanted.stop
    if start is not None and start < 0:  # a suffix range: the last -start bytes
        start, stop = max(0, size + start), size
    start = start or 0
    stop = size if stop is None else min(stop, size)
    if start >= stop:
        raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
    return start, stop


def _window(chunks: Iterator[bytes], start: int, stop: int) -> Iterator[bytes]:
    """The bytes [start, stop) of a chunk stream."""
    offset = 0
    for chunk in chunks:
        end = offset + len(chunk)
        if end > start and offset < stop:
            yield chunk[max(0, start - offset) : min(len(chunk), stop - offset)]
        if end >= stop:
            return
        offset = end


def _compressed(chunks: Iterator[bytes]) -> Iterator[bytes]:
    compressor = zstandard.ZstdCompressor(level=3).compressobj()
    for chunk in chunks:
        out = compressor.compress(chunk)
        if out:
            yield out
    yield compressor.flush()
