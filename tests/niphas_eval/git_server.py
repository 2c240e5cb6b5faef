"""A private git forge on loopback: `git http-backend` (git's own smart HTTP server, run as a
CGI) behind HTTP basic authentication, one token per repository, recording every request's
repository and credentials so tests can tell which secret went where."""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web


@dataclass
class GitForge:
    url: str
    """`http://127.0.0.1:PORT`; a repository `<root>/<name>` is `<url>/<name>/.git`."""
    tokens: dict[str, tuple[str, str]]
    seen: list[tuple[str, str | None]] = field(default_factory=list)
    """(repository, the Authorization header or None) per request."""

    def repo_url(self, name: str) -> str:
        return f"{self.url}/{name}/.git"

    def authorizations(self, repository: str) -> set[str | None]:
        return {auth for repo, auth in self.seen if repo == repository}


def basic(user: str, token: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()


@asynccontextmanager
async def git_forge(root: Path, tokens: dict[str, tuple[str, str]]) -> AsyncIterator[GitForge]:
    """Serve the repositories under `root`; `tokens`: repository name -> (user, token)."""
    forge = GitForge("", tokens)

    async def handle(request: web.Request) -> web.StreamResponse:
        repo = request.path.strip("/").split("/", 1)[0]
        auth = request.headers.get("Authorization")
        forge.seen.append((repo, auth))
        if repo not in tokens or auth != basic(*tokens[repo]):
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="git"'})
        body = await request.read()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": str(root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "PATH_INFO": request.path,
            "REQUEST_METHOD": request.method,
            "QUERY_STRING": request.query_string,
            "CONTENT_TYPE": request.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_USER": tokens[repo][0],
            "REMOTE_ADDR": "127.0.0.1",
            "HTTP_GIT_PROTOCOL": request.headers.get("Git-Protocol", ""),
        }
        proc = await asyncio.create_subprocess_exec(
            "git", "http-backend", env=env,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, _ = await proc.communicate(body)
        head, _, payload = out.partition(b"\r\n\r\n")
        status, headers = 200, {}
        for line in head.decode().split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers[name] = value.strip()
        return web.Response(status=status, headers=headers, body=payload)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    forge.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield forge
    finally:
        await runner.cleanup()
