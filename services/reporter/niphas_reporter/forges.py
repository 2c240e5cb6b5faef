"""Commit statuses as each forge's API takes them: one function per forge.

- GitHub, "Create a commit status": `POST {api}/repos/{owner}/{repo}/statuses/{sha}`,
  `Authorization: Bearer <token>`, JSON `state` (error, failure, pending, success),
  `target_url`, `description`, `context`. API: https://api.github.com for github.com, else
  `https://<host>/api/v3` (GitHub Enterprise).
- Gitea and Forgejo: `POST {api}/repos/{owner}/{repo}/statuses/{sha}` under
  `https://<host>/api/v1`, `Authorization: token <token>`, JSON `state` (pending, success,
  error, failure, warning), `target_url`, `description`, `context`.
- GitLab, "Set the pipeline status of a commit": `POST {api}/projects/{id}/statuses/{sha}`
  under `https://<host>/api/v4`, `{id}` the URL-encoded project path, `PRIVATE-TOKEN:
  <token>`, JSON `state` (pending, running, success, failed, canceled), `name`, `ref`,
  `target_url`, `description`.

Our states are `pending`, `running`, `success`, `failure` and `cancelled`; a forge without
one gets its nearest (GitHub and Gitea: running -> pending, cancelled -> error, with the
description saying cancelled).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote, urlsplit

from niphas_common.repo_credentials import RepositoryCredential

State = Literal["pending", "running", "success", "failure", "cancelled"]
ForgeKind = Literal["github", "gitea", "forgejo", "gitlab"]
DESCRIPTION_MAX = 140
"""Characters of description every forge keeps (GitHub's UI shows about that many)."""

_SCP = re.compile(r"^[^@/]+@(?P<host>[^:/]+):(?P<path>.+)$")
_STATES: dict[str, dict[str, str]] = {
    "github": {"running": "pending", "cancelled": "error"},
    "gitea": {"running": "pending", "cancelled": "error"},
    "gitlab": {"failure": "failed", "cancelled": "canceled"},
}


class ForgeError(ValueError):
    """No status can be posted for this repository (its URL or entry does not say where)."""


@dataclass(frozen=True)
class CommitStatus:
    """One status of one commit: its context (niphas/eval, niphas/build/<attr>) and state."""

    repository: str
    commit: str
    context: str
    state: State
    description: str
    target_url: str | None = None
    ref: str | None = None


@dataclass(frozen=True)
class Request:
    method: str
    url: str
    headers: dict[str, str]
    body: dict[str, Any]

    def __repr__(self) -> str:  # the headers hold the token
        return f"Request({self.method} {self.url})"


def location(repository: str) -> tuple[str, str, str]:
    """(scheme, host[:port], owner/repo path) of a clone URL (https, ssh or scp-like)."""
    url = repository.removeprefix("git+")
    if match := _SCP.match(url):
        scheme, host, path = "https", match["host"], match["path"]
    else:
        parts = urlsplit(url)
        scheme = parts.scheme if parts.scheme in ("http", "https") else "https"
        host = parts.hostname or ""
        if parts.port is not None and parts.scheme in ("http", "https"):
            host = f"{host}:{parts.port}"
        path = parts.path
    path = path.strip("/")
    path = path[:-4] if path.endswith(".git") else path
    if not host or path.count("/") < 1:
        raise ForgeError(f"{repository}: not a forge repository URL (host/owner/name)")
    return scheme, host, path


def forge_of(credential: RepositoryCredential, repository: str, seen: str | None) -> ForgeKind:
    """The entry's `forge`, else the forge a webhook of the repository came from, else the
    well-known hosts."""
    for kind in (credential.forge, seen):
        if kind in ("github", "gitea", "forgejo", "gitlab"):
            return kind  # type: ignore[return-value]
    host = location(repository)[1]
    if host == "github.com":
        return "github"
    if host == "gitlab.com":
        return "gitlab"
    if host == "codeberg.org":
        return "forgejo"
    raise ForgeError(f"{repository}: which forge? set `forge` in its credentials entry")


def api_base(kind: ForgeKind, credential: RepositoryCredential, repository: str) -> str:
    if credential.api_url:
        return credential.api_url.rstrip("/")
    scheme, host, _ = location(repository)
    if kind == "github":
        return "https://api.github.com" if host == "github.com" else f"{scheme}://{host}/api/v3"
    if kind == "gitlab":
        return f"{scheme}://{host}/api/v4"
    return f"{scheme}://{host}/api/v1"


def request(
    kind: ForgeKind, credential: RepositoryCredential, token: str, status: CommitStatus
) -> Request:
    """The HTTP request that sets `status` on `kind`'s API."""
    base = api_base(kind, credential, status.repository)
    path = location(status.repository)[2]
    family = "gitea" if kind == "forgejo" else kind
    state = _STATES[family].get(status.state, status.state)
    description = status.description[:DESCRIPTION_MAX]
    body: dict[str, Any] = {"state": state, "description": description}
    if status.target_url:
        body["target_url"] = status.target_url
    if family == "gitlab":
        body["name"] = status.context
        if status.ref:
            body["ref"] = status.ref.removeprefix("refs/heads/").removeprefix("refs/tags/")
        url = f"{base}/projects/{quote(path, safe='')}/statuses/{status.commit}"
        headers = {"PRIVATE-TOKEN": token}
    else:
        body["context"] = status.context
        url = f"{base}/repos/{path}/statuses/{status.commit}"
        if family == "github":
            headers = {
                "Authorization": f"Bearer {token}",
                "Accept": "application/vnd.github+json",
                "X-GitHub-Api-Version": "2022-11-28",
            }
        else:
            headers = {"Authorization": f"token {token}"}
    return Request("POST", url, headers, body)
