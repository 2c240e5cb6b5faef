"""PUT into the cluster cache: what Nix's HTTP binary cache store does on `nix copy --to`.

Nix 2.8 uploads each path as `PUT nar/<filehash>.nar[.zst]`, then `PUT <hash>.narinfo`, with
`Expect: 100-continue`, and sends the credentials of its `netrc-file` for the cache's host as
HTTP basic auth on every request. An upload is accepted when its password (or a
`Bearer` token) is the upload token; the user name is not checked. Refusals are decided before
a byte of the body is read (the answer to `Expect: 100-continue`):

- 503 while no upload token is configured (named in the body, the log and /readyz);
- 401 without credentials or with another token;
- 403 for any other name (`nix-cache-info` is fixed, never written; no `..`, no listings);
- 409 for a narinfo whose NAR or references are not in the cache yet, or that is not signed by
  a trusted key; 400 for a NAR whose bytes do not hash to its name; 413 over the size limit.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from niphas_common.requirements import Requirements

from .cache_files import NAR_RE, NARINFO_RE, BadName, CacheFiles, Refused, TooLarge
from .metrics import CACHE_UPLOADS

log = logging.getLogger(__name__)

CHUNK = 1 << 20
REALM = 'Basic realm="niphas-cache", charset="UTF-8"'


@dataclass(frozen=True)
class CacheRole:
    """What the cache endpoints serve from and check uploads against."""

    node: str
    files: CacheFiles
    token_file: Path | None
    priority: int = 30
    requirements: Requirements = field(default_factory=lambda: Requirements("mesh"))
    """The upload token as a requirement: /readyz names the Secret while it is missing and
    the log says so once (and again at a low rate), not once per refused upload."""

    def __post_init__(self) -> None:
        self.requirements.add("upload token", self._token_missing)

    def token(self) -> str | None:
        """The upload token (read each time: a rotated Secret takes effect without a
        restart), or None when none is configured or its file is missing or empty."""
        if self.token_file is None:
            return None
        try:
            return self.token_file.read_text().strip() or None
        except OSError:
            return None

    def _token_missing(self) -> str | None:
        if self.token() is not None:
            return None
        where = self.token_file or "NIPHAS_MESH_UPLOAD_TOKEN_FILE (unset)"
        return (
            f"no upload token in {where}: create the Secret niphas-cache-upload (key token); "
            "uploads get 503 until then"
        )

    async def readiness(self) -> str | None:
        if not os.access(self.files.root, os.W_OK):
            return f"cache directory {self.files.root} is not writable"
        return self.requirements.check()


ROLE = web.AppKey("cache_role", CacheRole)


def _presented(request: web.Request) -> str | None:
    """The token the request presents (basic auth password, or a bearer token)."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[2]
    return None


def refusal(request: web.Request) -> web.Response | None:
    """Why this upload is refused before its body is read, or None to accept it."""
    role = request.app[ROLE]
    name = request.match_info["name"]
    token = role.token()
    if token is None:
        text = (
            "503: uploads are disabled: the cache has no upload token "
            f"({role.token_file}; Secret niphas-cache-upload, key token)\n"
        )
        return web.Response(status=503, text=text)
    presented = _presented(request)
    if presented is None or not hmac.compare_digest(presented.encode(), token.encode()):
        why = "no credentials" if presented is None else "a wrong upload token"
        log.warning("cache: refused PUT %s from %s: %s", name, request.remote, why)
        CACHE_UPLOADS.labels(role.node, "unauthorized").inc()
        text = (
            f"401: uploads need the cache's upload token, got {why}: HTTP basic auth with the "
            "token of Secret niphas-cache-upload as password (nix sends it from its "
            "netrc-file)\n"
        )
        return web.Response(status=401, text=text, headers={"WWW-Authenticate": REALM})
    if not (NARINFO_RE.match(name) or NAR_RE.match(name)):
        CACHE_UPLOADS.labels(role.node, "bad_name").inc()
        text = f"403: {name!r}: only <hash>.narinfo and nar/<filehash>.nar[.zst] can be uploaded\n"
        return web.Response(status=403, text=text)
    return None


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """Answer `Expect: 100-continue`: a refusal at once, else let the body come."""
    refused = refusal(request)
    if refused is not None:
        return refused
    if request.headers.get("Expect", "").lower() != "100-continue":
        raise web.HTTPExpectationFailed(text=f"unknown Expect: {request.headers['Expect']}\n")
    if request.version >= (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0
    return None


async def handle(request: web.Request) -> web.Response:
    refused = refusal(request)
    if refused is not None:
        return refused
    role, name = request.app[ROLE], request.match_info["name"]
    try:
        await role.files.put(name, _body(request))
    except TooLarge as exc:
        return _refused(role.node, 413, str(exc))
    except BadName as exc:
        return _refused(role.node, 403, str(exc))
    except Refused as exc:
        status = 400 if NAR_RE.match(name) else 409
        return _refused(role.node, status, str(exc))
    CACHE_UPLOADS.labels(role.node, "stored").inc()
    return web.Response(status=201, text="stored\n")


def _refused(node: str, status: int, reason: str) -> web.Response:
    log.warning("cache: refused upload: %s", reason)
    CACHE_UPLOADS.labels(node, "refused").inc()
    return web.Response(status=status, text=f"{status}: {reason}\n")


async def _body(request: web.Request) -> AsyncIterator[bytes]:
    async for chunk in request.content.iter_chunked(CHUNK):
        yield chunk
