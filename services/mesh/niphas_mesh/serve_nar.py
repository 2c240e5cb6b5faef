"""`/nar/<name>`: NAR downloads.

`<hash>.nar` (and `.nar.zst` when the node serves zstd) is streamed straight from the store path
through the NAR serialiser: nothing is stored twice and nothing is compressed unless asked for.
Uncompressed NARs have a known length (NarSize), so HEAD and single byte ranges are answered
exactly (a peer can fetch parts of one large NAR from several holders). Any other name is a file
of the cache directory, served as a static file (which handles Range and HEAD itself).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import zstandard
from aiohttp import web

from niphas_common.nix.nar import iter_nar

from .cache_view import HASH_RE, VIEW
from .metrics import SERVED_BYTES

_OWN_RE = re.compile(rf"^({HASH_RE})\.nar(\.zst)?$")
_CACHE_FILE_RE = re.compile(r"^[A-Za-z0-9+\-_=][A-Za-z0-9+\-._=]*$")
CHUNK = 4 << 20
"""Bytes per hand-off from the serialiser thread (fewer hops for closures of small files)."""


async def handle(request: web.Request) -> web.StreamResponse:
    view = request.app[VIEW]
    name = request.match_info["name"]
    own = _OWN_RE.match(name)
    if own is not None:
        info = view.store.lookup(own.group(1))
        zst = own.group(2) is not None
        if info is not None and view.store.is_signed(info) and zst == (view.compression == "zstd"):
            view.last_use.touch(info.path.hash_part)
            return await _stream(request, view.store.real_path(info.path), info.nar_size, zst)
    elif view.cache_dir is not None and _CACHE_FILE_RE.match(name):
        file = view.cache_dir / "nar" / name
        if file.is_file():
            SERVED_BYTES.labels(view.node, "cache").inc(file.stat().st_size)
            return web.FileResponse(file, headers={"Content-Type": "application/x-nix-nar"})
    raise web.HTTPNotFound(text="no such NAR\n")


async def _stream(request: web.Request, path: Path, size: int, zst: bool) -> web.StreamResponse:
    view = request.app[VIEW]
    start, stop = 0, size
    resp = web.StreamResponse(headers={"Content-Type": "application/x-nix-nar"})
    if not zst:
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
    await resp.prepare(request)
    if request.method == "HEAD":
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
