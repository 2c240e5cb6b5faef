"""Build logs over HTTP, at the URLs the commit statuses link to.

    GET /logs/drv/<hash>            one build's full log (text/plain); ?follow=1 streams it
                                    until the build ends
    GET /logs/push/<id or commit>   every build of a push, one after another

An unknown or malformed id is `404 no such log` (the same answer whatever the reason, so
nothing about other builds leaks); with `NIPHAS_REPORTER_LOGS_TOKEN_FILE` set, a request
without `Authorization: Bearer <that token>` is `403 forbidden`, before anything is looked up.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

from aiohttp import web

from niphas_common.bus.build_logs import BuildLogs, UnknownLog

from .metrics import LOG_REQUESTS

log = logging.getLogger(__name__)

TEXT = {"Content-Type": "text/plain; charset=utf-8", "X-Content-Type-Options": "nosniff"}


class LogsEndpoint:
    def __init__(self, logs: BuildLogs, token_file: Path | None = None) -> None:
        self.logs = logs
        self.token_file = token_file

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/logs/drv/{key}", self.drv)
        app.router.add_get("/logs/push/{push}", self.push)

    def _refused(self, request: web.Request) -> web.Response | None:
        if self.token_file is None:
            return None
        try:
            token = self.token_file.read_text().strip()
        except OSError:
            token = ""
        offered = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if token and hmac.compare_digest(offered.encode(), token.encode()):
            return None
        return _answer(403, "forbidden\n")

    async def drv(self, request: web.Request) -> web.StreamResponse:
        if (refused := self._refused(request)) is not None:
            return refused
        key = request.match_info["key"]
        follow = request.query.get("follow") in ("1", "true", "yes")
        try:
            if not follow:
                text, end = await self.logs.read(key)
                trailer = f"\n[{end}]\n" if end else "\n[still building]\n"
                return _answer(200, text + trailer)
            return await self._stream(request, key)
        except UnknownLog:
            return _answer(404, "no such log\n")

    async def _stream(self, request: web.Request, key: str) -> web.StreamResponse:
        chunks = self.logs.follow(key)
        first = await anext(chunks)  # UnknownLog before any header is sent
        response = web.StreamResponse(headers=TEXT)
        await response.prepare(request)
        LOG_REQUESTS.labels("200").inc()
        chunk = first
        while True:
            await response.write(chunk.text.encode())
            if chunk.end is not None:
                await response.write(f"\n[{chunk.end}]\n".encode())
                break
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                break
        await response.write_eof()
        return response

    async def push(self, request: web.Request) -> web.Response:
        if (refused := self._refused(request)) is not None:
            return refused
        try:
            builds = await self.logs.builds_of_push(request.match_info["push"])
        except UnknownLog:
            return _answer(404, "no such log\n")
        parts = []
        for attribute, key in builds:
            parts.append(f"==> {attribute} ({key}) <==\n")
            try:
                text, end = await self.logs.read(key)
            except UnknownLog:
                parts.append("(no log kept: cached, not built here, or expired)\n")
                continue
            parts.append(text + (f"\n[{end}]\n" if end else "\n[still building]\n"))
        return _answer(200, "".join(parts))


def _answer(code: int, text: str) -> web.Response:
    LOG_REQUESTS.labels(str(code)).inc()
    return web.Response(status=code, text=text, headers=TEXT)
