"""The staging endpoint build pods upload their outputs to, as a Nix HTTP binary cache.

Under `/staging/<drv hash>/<token>/` it answers what `nix copy --to http://...` (Nix 2.8)
asks, in that order: GET nix-cache-info; GET and HEAD `<hash>.narinfo` (200 for a path the
real cache already holds, with its narinfo, so the pod uploads only what is new); HEAD
`nar/<file>`; PUT `nar/<file>.nar[.zst]`, then PUT `<hash>.narinfo`. Nothing else can be
written. When the builder knows the job's outputs (it had the `.drv`), a narinfo for any
other path that is neither a `.drv` nor a source is refused at once (HTTP 403 with the
reason, which lands in the pod's log); the full verification, by content, happens when the
Job is done (`StagingArea.publish`). Uploads are written to a temporary file and renamed, so a half
upload is never mistaken for a whole one.
"""

from __future__ import annotations

import contextlib
import os
import re

from aiohttp import web

from niphas_common.nix.errors import NixError

from .staging import CACHE_INFO, StagingArea
from .verify import NAR_URL_RE, UploadRefused, parse_narinfo

NARINFO_RE = re.compile(r"^[0-9a-z]{32}\.narinfo$")
MAX_NARINFO_BYTES = 64 * 1024
AREA: web.AppKey[StagingArea] = web.AppKey("staging", StagingArea)
LIMIT: web.AppKey[int] = web.AppKey("limit", int)


def build_app(area: StagingArea, max_nar_bytes: int) -> web.Application:
    app = web.Application(client_max_size=MAX_NARINFO_BYTES)
    app[AREA] = area
    app[LIMIT] = max_nar_bytes
    base = "/staging/{drv:[0-9a-z]{32}}/{token:[0-9a-f]+}"
    app.router.add_get(f"{base}/nix-cache-info", cache_info)
    app.router.add_get(f"{base}/{{name}}", read)  # aiohttp answers HEAD through GET routes
    app.router.add_get(f"{base}/nar/{{name}}", read_nar)
    app.router.add_put(f"{base}/{{name}}", put_narinfo)
    app.router.add_put(f"{base}/nar/{{name}}", put_nar)
    return app


def _area(request: web.Request) -> StagingArea:
    """The staging area, once the token matches a build that is waiting for uploads."""
    area = request.app[AREA]
    if not area.accepts(request.match_info["drv"], request.match_info["token"]):
        raise web.HTTPForbidden(text="no build of this derivation is waiting for this token\n")
    return area


async def cache_info(request: web.Request) -> web.Response:
    _area(request)
    return web.Response(text=CACHE_INFO, content_type="text/x-nix-cache-info")


async def read(request: web.Request) -> web.StreamResponse:
    area, name = _area(request), request.match_info["name"]
    if not NARINFO_RE.match(name):
        raise web.HTTPNotFound()
    staged = area.directory(request.match_info["drv"]) / name
    if staged.is_file():
        return web.FileResponse(staged)
    # A path the cache already has (with a trusted signature) need not be uploaded again.
    try:
        info = await area.cache.client.narinfo_by_hash(name.removesuffix(".narinfo"))
    except NixError:
        info = None  # VerificationError: the cache holds it under another name, or untrusted
    if info is None:
        raise web.HTTPNotFound()
    return web.Response(text=info.render(), content_type="text/x-nix-narinfo")


async def read_nar(request: web.Request) -> web.StreamResponse:
    area, name = _area(request), request.match_info["name"]
    staged = area.directory(request.match_info["drv"]) / "nar" / name
    if NAR_URL_RE.match(f"nar/{name}") and staged.is_file():
        return web.FileResponse(staged)
    raise web.HTTPNotFound()


async def put_narinfo(request: web.Request) -> web.Response:
    area, name, drv = _area(request), request.match_info["name"], request.match_info["drv"]
    if not NARINFO_RE.match(name):
        raise web.HTTPForbidden(text=f"only NARs and narinfos can be uploaded, not {name!r}\n")
    try:
        info = parse_narinfo(await request.read(), name)
        if (problem := area.door_problem(drv, info)) is not None:
            raise UploadRefused(problem)
    except UploadRefused as exc:
        raise web.HTTPForbidden(text=f"{exc}\n") from exc
    _write(area.directory(drv) / name, await request.read())
    return web.Response(text="stored\n")


async def put_nar(request: web.Request) -> web.Response:
    area, name, drv = _area(request), request.match_info["name"], request.match_info["drv"]
    if not NAR_URL_RE.match(f"nar/{name}"):
        raise web.HTTPForbidden(text=f"{name!r} is not a NAR file name\n")
    limit = request.app[LIMIT]
    target = area.directory(drv) / "nar" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{name}.{os.getpid()}-{id(request)}")
    size = 0
    try:
        with tmp.open("wb") as out:
            async for chunk in request.content.iter_chunked(1 << 20):
                size += len(chunk)
                if size > limit:
                    raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size)
                out.write(chunk)
        tmp.rename(target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return web.Response(text="stored\n")


def _write(target: os.PathLike[str], data: bytes) -> None:
    path = os.fspath(target)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as out:
        out.write(data)
    os.rename(tmp, path)
