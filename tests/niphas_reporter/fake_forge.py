"""A forge's commit status API on loopback, checking each request as the forge documents it.

One aiohttp server answers for GitHub (`POST /repos/{owner}/{repo}/statuses/{sha}`, Bearer
token, states error/failure/pending/success, `context`), Gitea/Forgejo (the same path under
`/api/v1`, `Authorization: token`, states pending/success/error/failure/warning) and GitLab
(`POST /api/v4/projects/{url-encoded path}/statuses/{sha}`, `PRIVATE-TOKEN`, states
pending/running/success/failed/canceled, `name`). A request that breaks the documented API
is answered 422 and recorded as a violation; good ones are recorded as `Posted`. `fail_next`
makes the next requests answer 503, as a forge having a bad day.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

SHA = re.compile(r"^[0-9a-f]{40}$")
STATES = {
    "github": {"error", "failure", "pending", "success"},
    "gitea": {"pending", "success", "error", "failure", "warning"},
    "gitlab": {"pending", "running", "success", "failed", "canceled"},
}
FIELDS = {
    "github": {"state", "target_url", "description", "context"},
    "gitea": {"state", "target_url", "description", "context"},
    "gitlab": {
        "state",
        "ref",
        "name",
        "context",
        "target_url",
        "description",
        "coverage",
        "pipeline_id",
    },
}


@dataclass(frozen=True)
class Posted:
    forge: str
    project: str
    sha: str
    body: dict[str, Any]

    @property
    def context(self) -> str:
        return str(self.body.get("context") or self.body.get("name"))


@dataclass
class FakeForge:
    tokens: dict[str, str]
    """project path (owner/repo) -> the token it accepts."""
    posted: list[Posted] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    failures_left: int = 0
    failing: str | None = None
    requests: int = 0
    url: str = ""

    def fail_next(self, count: int, only: str | None = None) -> None:
        """Answer the next `count` requests (to forge `only`, or any) with 503."""
        self.failures_left, self.failing = count, only

    def states(self, context: str) -> list[str]:
        return [p.body["state"] for p in self.posted if p.context == context]

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/repos/{owner}/{repo}/statuses/{sha}", self._github)
        app.router.add_route("*", "/api/v1/repos/{owner}/{repo}/statuses/{sha}", self._gitea)
        app.router.add_route("*", "/api/v4/projects/{id}/statuses/{sha}", self._gitlab)
        return app

    async def _github(self, request: web.Request) -> web.Response:
        project = f"{request.match_info['owner']}/{request.match_info['repo']}"
        expected = f"Bearer {self.tokens.get(project)}"
        if request.headers.get("Accept") != "application/vnd.github+json":
            return self._violation("github: Accept is not application/vnd.github+json")
        return await self._check(
            request, "github", project, request.headers.get("Authorization"), expected
        )

    async def _gitea(self, request: web.Request) -> web.Response:
        project = f"{request.match_info['owner']}/{request.match_info['repo']}"
        expected = f"token {self.tokens.get(project)}"
        return await self._check(
            request, "gitea", project, request.headers.get("Authorization"), expected
        )

    async def _gitlab(self, request: web.Request) -> web.Response:
        raw = request.raw_path.split("/projects/", 1)[1].split("/", 1)[0]
        if "%2F" not in raw:
            return self._violation(f"gitlab: project id {raw!r} is not the URL-encoded path")
        project = request.match_info["id"]
        return await self._check(
            request,
            "gitlab",
            project,
            request.headers.get("PRIVATE-TOKEN"),
            self.tokens.get(project),
        )

    def _violation(self, what: str, status: int = 422) -> web.Response:
        self.violations.append(what)
        return web.json_response({"message": what}, status=status)

    async def _check(
        self, request: web.Request, forge: str, project: str, auth: str | None, expected: Any
    ) -> web.Response:
        self.requests += 1
        if self.failures_left > 0 and self.failing in (None, forge):
            self.failures_left -= 1
            return web.json_response({"message": "try later"}, status=503)
        if request.method != "POST":
            return self._violation(f"{forge}: method {request.method}", 405)
        if project not in self.tokens or auth != expected:
            return self._violation(f"{forge}: bad credentials for {project}", 401)
        if request.content_type != "application/json":
            return self._violation(f"{forge}: content type {request.content_type}")
        sha = request.match_info["sha"]
        body = await request.json()
        if not SHA.match(sha):
            return self._violation(f"{forge}: sha {sha!r}")
        if not isinstance(body, dict) or body.get("state") not in STATES[forge]:
            return self._violation(f"{forge}: state {body!r}")
        if set(body) - FIELDS[forge]:
            return self._violation(f"{forge}: unknown fields {sorted(set(body) - FIELDS[forge])}")
        if forge != "gitlab" and not body.get("context"):
            return self._violation(f"{forge}: no context")
        if forge == "gitlab" and not body.get("name"):
            return self._violation("gitlab: no name")
        if len(str(body.get("description", ""))) > 140:
            return self._violation(f"{forge}: description too long")
        self.posted.append(Posted(forge, project, sha, body))
        return web.json_response({"id": len(self.posted), **body}, status=201)


@contextlib.asynccontextmanager
async def serving_forge(forge: FakeForge) -> AsyncIterator[FakeForge]:
    runner = web.AppRunner(forge.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    forge.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield forge
    finally:
        await runner.cleanup()
