"""HTTP servers the mesh tests fetch from: the builder's cache with a byte counter, and
hostile peers. A hostile peer is a real adversary on a real socket, not a fake: it answers
narinfo and NAR requests for any path of a real signed cache, tampered with in one way."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Container
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from aiohttp import web

from niphas_common.nix.nar import nar_string
from niphas_common.nix.narinfo import NarInfo
from niphas_common.nix.signing import SecretKey


@dataclass
class Served:
    """What a server sent: NAR bytes in total and requests per NAR name."""

    requests: int = 0
    """Every request, of any file (narinfo, nar, nix-cache-info), found or not."""
    nar_bytes: int = 0
    nar_requests: Counter[str] = field(default_factory=Counter)
    range_requests: int = 0
    cut: int = 0
    """NAR responses dropped half way (`counting_cache(cut=...)`)."""


@asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def counting_cache(
    directory: Path,
    hold: asyncio.Event | None = None,
    *,
    cut: asyncio.Event | None = None,
    only: Container[str] | None = None,
) -> AsyncIterator[tuple[str, Served]]:
    """Serve a file cache directory like nginx would, counting the NAR bytes it sends.

    With `hold`, every NAR stops after its first half until `hold` is set. With `cut`, the
    first NAR response stops after its first half and, once `cut` is set, the server drops
    the connection (the client gets a short body); later responses are whole. `only`: the
    NARs (`nar/<file>`, see `nar_file`) these faults apply to; None: all."""
    served = Served()
    first = [True]

    async def handle(request: web.Request) -> web.StreamResponse:
        served.requests += 1
        rel = request.match_info["rel"]
        file = directory / rel
        if ".." in rel.split("/") or not file.is_file():
            raise web.HTTPNotFound()
        body = file.read_bytes()
        if not rel.startswith("nar/"):
            return web.Response(body=body)
        served.nar_requests[rel] += 1
        faulty = only is None or rel in only
        if faulty and cut is not None and first[0]:
            first[0] = False
            return await _cut(request, body, cut, served)
        if faulty and hold is not None:
            return await _held(request, body, hold, served)
        served.nar_bytes += len(body)
        return web.Response(body=body)

    app = web.Application()
    app.router.add_get("/{rel:.+}", handle)
    async with serve(app) as url:
        yield url, served


async def _held(
    request: web.Request, body: bytes, hold: asyncio.Event, served: Served
) -> web.StreamResponse:
    """The first half of `body`, then (once `hold` is set) the rest."""
    resp = web.StreamResponse()
    resp.content_length = len(body)
    await resp.prepare(request)
    await resp.write(body[: len(body) // 2])
    served.nar_bytes += len(body) // 2
    await hold.wait()
    with contextlib.suppress(ConnectionResetError):  # the client may have gone meanwhile
        await resp.write(body[len(body) // 2 :])
        served.nar_bytes += len(body) - len(body) // 2
        await resp.write_eof()
    return resp


async def _cut(
    request: web.Request, body: bytes, cut: asyncio.Event, served: Served
) -> web.StreamResponse:
    """The first half of `body`, then (once `cut` is set) the connection is dropped, as by
    an upstream that died mid-response."""
    resp = web.StreamResponse()
    resp.content_length = len(body)
    await resp.prepare(request)
    await resp.write(body[: len(body) // 2])
    served.nar_bytes += len(body) // 2
    served.cut += 1
    await cut.wait()
    assert request.transport is not None
    request.transport.abort()  # no more bytes, no clean end: a dead upstream
    return resp


def nar_file(cache_dir: Path, hash_part: str) -> str:
    """The cache's NAR file of a path, as its narinfo's URL names it (`nar/<file>`)."""
    return NarInfo.parse((cache_dir / f"{hash_part}.narinfo").read_text()).url


def traversal_nar() -> bytes:
    """A directory with an entry named `..` (would write beside the store path)."""
    s = nar_string
    entry = s(b"entry") + s(b"(") + s(b"name") + s(b"..") + s(b"node")
    file = s(b"(") + s(b"type") + s(b"regular") + s(b"contents") + s(b"x") + s(b")")
    return (
        s(b"nix-archive-1") + s(b"(") + s(b"type") + s(b"directory")
        + entry + file + s(b")") + s(b")")
    )  # fmt: skip


def escaping_symlink_nar(outside: Path) -> bytes:
    """A symlink `a` pointing outside, then a directory `a` with a file: written naively, the
    file would land at `<outside>/pwned`."""
    s = nar_string
    link = s(b"(") + s(b"type") + s(b"symlink") + s(b"target") + s(str(outside).encode()) + s(b")")
    file = s(b"(") + s(b"type") + s(b"regular") + s(b"contents") + s(b"pwned") + s(b")")
    inner = s(b"(") + s(b"type") + s(b"directory") + s(b"entry") + s(b"(") + s(b"name")
    inner += s(b"pwned") + s(b"node") + file + s(b")") + s(b")")
    entry_a = s(b"entry") + s(b"(") + s(b"name") + s(b"a") + s(b"node")
    return (
        s(b"nix-archive-1") + s(b"(") + s(b"type") + s(b"directory")
        + entry_a + link + s(b")") + entry_a + inner + s(b")") + s(b")")
    )  # fmt: skip


def uncompressed_narinfo(cache_dir: Path, hash_part: str) -> NarInfo | None:
    """The cache's narinfo as a node would serve it: `nar/<hash>.nar`, uncompressed."""
    file = cache_dir / f"{hash_part}.narinfo"
    if not file.is_file():
        return None
    info = NarInfo.parse(file.read_text())
    return replace(
        info, url=f"nar/{hash_part}.nar", compression="none", file_hash=None, file_size=None
    )


@asynccontextmanager
async def range_peer(cache_dir: Path, corrupt: bool = False) -> AsyncIterator[tuple[str, Served]]:
    """A peer answering byte ranges of the cache's NARs, counting its requests; `corrupt`
    flips one byte in the middle of every range it sends."""
    served = Served()

    async def narinfo(request: web.Request) -> web.Response:
        info = uncompressed_narinfo(cache_dir, request.match_info["hash"])
        if info is None:
            raise web.HTTPNotFound()
        return web.Response(text=info.render())

    async def nar(request: web.Request) -> web.Response:
        hash_part = request.match_info["hash"]
        info = NarInfo.parse((cache_dir / f"{hash_part}.narinfo").read_text())
        body = (cache_dir / info.url).read_bytes()  # the test caches are uncompressed
        served.nar_requests[hash_part] += 1
        wanted = request.http_range
        start, stop = wanted.start or 0, len(body) if wanted.stop is None else wanted.stop
        part = bytearray(body[start:stop])
        if corrupt and part:
            part[len(part) // 2] ^= 0xFF
        served.nar_bytes += len(part)
        if wanted.start is None and wanted.stop is None:
            return web.Response(body=bytes(part))
        served.range_requests += 1
        headers = {"Content-Range": f"bytes {start}-{stop - 1}/{len(body)}"}
        return web.Response(status=206, body=bytes(part), headers=headers)

    app = web.Application()
    app.router.add_get("/nix-cache-info", cache_info)
    app.router.add_get("/{hash:[0-9a-z]{32}}.narinfo", narinfo)
    app.router.add_get("/nar/{hash:[0-9a-z]{32}}.nar", nar)
    async with serve(app) as url:
        yield url, served


MODES = ("corrupt", "wrong-narhash", "stripped", "forged", "traversal", "symlink", "stall")


@asynccontextmanager
async def hostile_peer(
    mode: str, cache_dir: Path, outside: Path, hold: asyncio.Event | None = None
) -> AsyncIterator[str]:
    """A peer serving the cache's paths, tampered with according to `mode`; with `hold`, every
    NAR stops after its first half until `hold` is set."""
    forger = SecretKey.generate("niphas-test-1")  # the trusted key's name, another key
    release = asyncio.Event()

    async def narinfo(request: web.Request) -> web.Response:
        hash_part = request.match_info["hash"]
        file = cache_dir / f"{hash_part}.narinfo"
        if not file.is_file():
            raise web.HTTPNotFound()
        info = NarInfo.parse(file.read_text())
        info = replace(info, url=f"nar/{hash_part}.nar", compression="none")
        info = replace(info, file_hash=None, file_size=None)
        if mode == "wrong-narhash":
            digest = bytearray(info.nar_hash.digest)
            digest[0] ^= 1
            info = replace(info, nar_hash=type(info.nar_hash)("sha256", bytes(digest)))
        elif mode == "stripped":
            info = replace(info, sigs=())
        elif mode == "forged":
            info = replace(info, sigs=()).signed(forger)
        return web.Response(text=info.render())

    async def nar(request: web.Request) -> web.StreamResponse:
        hash_part = request.match_info["hash"]
        info = NarInfo.parse((cache_dir / f"{hash_part}.narinfo").read_text())
        body = (cache_dir / info.url).read_bytes()  # the test caches are uncompressed
        if mode == "corrupt":
            # One byte of the first file's contents: still a well-formed NAR, another hash.
            at = body.index(b"contents") + 16
            body = body[:at] + bytes([body[at] ^ 0xFF]) + body[at + 1 :]
        elif mode == "traversal":
            body = traversal_nar()
        elif mode == "symlink":
            body = escaping_symlink_nar(outside)
        if mode == "stall":
            resp = web.StreamResponse()
            resp.content_length = len(body)
            await resp.prepare(request)
            await resp.write(body[: len(body) // 2])
            await release.wait()  # never sends the rest while the test runs
            return resp
        if hold is not None:
            return await _held(request, body, hold, Served())
        return web.Response(body=body)

    app = web.Application()
    app.router.add_get("/nix-cache-info", cache_info)
    app.router.add_get("/{hash:[0-9a-z]{32}}.narinfo", narinfo)
    app.router.add_get("/nar/{hash:[0-9a-z]{32}}.nar", nar)
    async with serve(app) as url:
        try:
            yield url
        finally:
            release.set()  # let a stalled response end before the server shuts down


async def cache_info(_: web.Request) -> web.Response:
    return web.Response(text="StoreDir: /nix/store\n")
