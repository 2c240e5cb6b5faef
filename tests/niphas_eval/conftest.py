"""Fixtures for the eval service: local git repositories as the forge's repos (their flakes
build with the session's busybox store path, no nixpkgs), deliveries built in each forge's
documented format and signed the way that forge signs them, a webhook server on loopback,
and evaluation workers over the real nats-server and the real nix."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import textwrap
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from niphas_common.bus import inspect
from niphas_common.bus.bus import Bus
from niphas_demo.sample import FlakeRepo
from niphas_eval.app import build_worker
from niphas_eval.ingress import WebhookIngress
from niphas_eval.secrets import WebhookSecrets
from niphas_eval.settings import EvalSettings
from niphas_eval.worker import EvalWorker
from niphas_schemas import EvalDone, PushReceived
from tests.nix_harness import NixTools, nix_system

FLAKE = """\
{
  inputs.tools = { url = "path:@TOOLS@"; flake = false; };
  outputs = { self, tools }:
    let
      system = "@SYSTEM@";
      bb = "${tools}/bin/busybox";
      app = derivation {
        inherit system;
        name = "greeter";
        builder = bb;
        args = [ "sh" "-c" "${bb} mkdir -p $out/bin && echo '@GREETING@' > $out/bin/greeting" ];
      } // { meta.mainProgram = "greeting"; };
    in {
      packages.${system} = { default = app; @PACKAGES@ };
      @OUTPUTS@
    };
}
"""


def flake_nix(
    tools: NixTools, greeting: str = "hello", *, packages: str = "", outputs: str = ""
) -> str:
    """A flake whose `default` package embeds `greeting` (so its store path follows it);
    `packages` adds attributes to packages.<system>, `outputs` adds top-level outputs."""
    return (
        FLAKE.replace("@TOOLS@", str(tools.path))
        .replace("@SYSTEM@", nix_system())
        .replace("@GREETING@", greeting)
        .replace("@PACKAGES@", packages)
        .replace("@OUTPUTS@", outputs)
    )


@dataclass
class GitRepo(FlakeRepo):
    """A local repository standing in for one hosted on a forge."""

    tools: NixTools
    commits: list[str] = field(default_factory=list)

    def commit(
        self,
        flake: str | None = None,
        message: str = "change",
        *,
        lock: bool = True,
        **kwargs: Any,
    ) -> str:
        """Commit flake.nix (default: `flake_nix(tools, **kwargs)`) with, when `lock`, its
        flake.lock (the worker takes inputs only from the committed lock); return the sha."""
        text = flake if flake is not None else flake_nix(self.tools, **kwargs)
        sha = self.commit_flake(textwrap.dedent(text), message, lock=lock)
        self.commits.append(sha)
        return sha


@pytest.fixture
def make_repo(tmp_path: Path, nix_tools: NixTools) -> Callable[[str], GitRepo]:
    def make(name: str = "app") -> GitRepo:
        directory = tmp_path / "forge" / name
        directory.mkdir(parents=True)
        repo = GitRepo(directory, nix_tools)
        repo.ensure()
        return repo

    return make


@pytest.fixture
def eval_settings(tmp_path: Path, nix_tools: NixTools) -> EvalSettings:
    """Allows the test's local repositories (file://<tmp>/forge/*) and, as an input, the
    session's busybox store path (an operator's tools, named exactly), nothing else."""
    return EvalSettings(
        state_dir=tmp_path / "state",
        allowed_refs=[f"file://{tmp_path}/forge/*", f"path:{nix_tools.path}"],
        eval_timeout_s=60,
        memory_limit_mb=2048,
        ack_wait_s=10,
        max_deliver=3,
    )


@pytest.fixture
async def worker(bus: Bus, eval_settings: EvalSettings) -> EvalWorker:
    return await build_worker(bus, eval_settings)


def push_for(
    repo: GitRepo, commit: str | None, ref: str | None = "refs/heads/main"
) -> PushReceived:
    return PushReceived(
        forge="github",
        repository=repo.url,
        ref=ref,
        commit=commit,
        delivery_id=uuid.uuid4().hex,
    )


async def eval_dones(bus: Bus) -> list[EvalDone]:
    return [
        EvalDone.model_validate_json(m.data) for m in await inspect.view(bus.js, "eval.done", 1000)
    ]


async def pushes(bus: Bus) -> list[PushReceived]:
    stored = await inspect.view(bus.js, "push.received", 1000)
    return [PushReceived.model_validate_json(m.data) for m in stored]


# -- forge deliveries, as each forge documents them ----------------------------------------


@dataclass(frozen=True)
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes


def github_push(
    secret: str | None,
    *,
    clone_url: str,
    full_name: str = "acme/app",
    ref: str = "refs/heads/main",
    before: str = "0" * 40,
    after: str,
    event: str = "push",
    delivery: str | None = None,
    payload: dict[str, Any] | None = None,
) -> Delivery:
    """A GitHub delivery: JSON body, `X-Hub-Signature-256: sha256=<hex HMAC-SHA256>`."""
    body = json.dumps(
        payload
        or {
            "ref": ref,
            "before": before,
            "after": after,
            "created": before == "0" * 40,
            "deleted": after == "0" * 40,
            "forced": False,
            "compare": f"https://github.example/{full_name}/compare/{before[:12]}...{after[:12]}",
            "commits": [],
            "head_commit": None,
            "repository": {
                "id": 1296269,
                "name": full_name.split("/")[1],
                "full_name": full_name,
                "html_url": f"https://github.example/{full_name}",
                "clone_url": clone_url,
                "ssh_url": f"git@github.example:{full_name}.git",
                "default_branch": "main",
            },
            "pusher": {"name": "octocat", "email": "octocat@github.example"},
            "sender": {"login": "octocat", "id": 1},
        }
    ).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "GitHub-Hookshot/044aadd",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
        "X-GitHub-Hook-ID": "292430182",
    }
    if secret is not None:
        digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        headers["X-Hub-Signature-256"] = f"sha256={digest}"
    return Delivery("/hooks/github", headers, body)


def github_ping(secret: str, *, clone_url: str, full_name: str = "acme/app") -> Delivery:
    payload = {
        "zen": "Design for failure.",
        "hook_id": 292430182,
        "hook": {"type": "Repository", "id": 292430182, "events": ["push"], "active": True},
        "repository": {"full_name": full_name, "clone_url": clone_url},
        "sender": {"login": "octocat"},
    }
    return github_push(secret, clone_url=clone_url, after="", event="ping", payload=payload)


def gitea_push(
    secret: str | None,
    *,
    clone_url: str,
    full_name: str = "acme/site",
    after: str,
    before: str = "0" * 40,
    ref: str = "refs/heads/main",
    forgejo: bool = False,
    delivery: str | None = None,
) -> Delivery:
    """A Gitea (or Forgejo) delivery: `X-Gitea-Signature` (Forgejo: `X-Forgejo-Signature`)
    is the bare hex HMAC-SHA256 of the body; GitHub- and Gogs-style headers come along."""
    body = json.dumps(
        {
            "ref": ref,
            "before": before,
            "after": after,
            "compare_url": f"https://gitea.example/{full_name}/compare/{before}...{after}",
            "commits": [{"id": after, "message": "change\n", "author": {"name": "gitea"}}],
            "total_commits": 1,
            "repository": {
                "id": 140,
                "owner": {"id": 1, "login": full_name.split("/")[0]},
                "name": full_name.split("/")[1],
                "full_name": full_name,
                "private": False,
                "html_url": f"https://gitea.example/{full_name}",
                "ssh_url": f"git@gitea.example:{full_name}.git",
                "clone_url": clone_url,
                "default_branch": "main",
            },
            "pusher": {"id": 1, "login": "gitea", "username": "gitea"},
            "sender": {"id": 1, "login": "gitea", "username": "gitea"},
        }
    ).encode()
    delivery = delivery or str(uuid.uuid4())
    vendor = "Forgejo" if forgejo else "Gitea"
    headers = {
        "Content-Type": "application/json",
        f"X-{vendor}-Event": "push",
        f"X-{vendor}-Event-Type": "push",
        f"X-{vendor}-Delivery": delivery,
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": delivery,
        "X-Gogs-Event": "push",
        "X-Gogs-Delivery": delivery,
    }
    if secret is not None:
        headers[f"X-{vendor}-Signature"] = hmac.new(
            secret.encode(), body, hashlib.sha256
        ).hexdigest()
    return Delivery("/hooks/gitea", headers, body)


def gitlab_push(
    token: str | None,
    *,
    clone_url: str,
    path_with_namespace: str = "acme/api",
    after: str,
    before: str = "0" * 40,
    ref: str = "refs/heads/main",
    event_uuid: str | None = None,
) -> Delivery:
    """A GitLab `Push Hook`: the secret token itself in `X-Gitlab-Token`, the event id in
    `X-Gitlab-Event-UUID`."""
    project = {
        "id": 15,
        "name": path_with_namespace.split("/")[-1],
        "web_url": f"https://gitlab.example/{path_with_namespace}",
        "git_ssh_url": f"git@gitlab.example:{path_with_namespace}.git",
        "git_http_url": clone_url,
        "namespace": path_with_namespace.split("/")[0],
        "path_with_namespace": path_with_namespace,
        "default_branch": "main",
    }
    body = json.dumps(
        {
            "object_kind": "push",
            "event_name": "push",
            "before": before,
            "after": after,
            "ref": ref,
            "ref_protected": True,
            "checkout_sha": None if after == "0" * 40 else after,
            "user_id": 4,
            "user_name": "John Smith",
            "user_username": "jsmith",
            "project_id": 15,
            "project": project,
            "repository": {
                "name": project["name"],
                "url": project["git_ssh_url"],
                "homepage": project["web_url"],
                "git_http_url": clone_url,
                "git_ssh_url": project["git_ssh_url"],
            },
            "commits": [],
            "total_commits_count": 0,
        }
    ).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "GitLab/17.0.0",
        "X-Gitlab-Event": "Push Hook",
        "X-Gitlab-Event-UUID": event_uuid or str(uuid.uuid4()),
        "X-Gitlab-Webhook-UUID": str(uuid.uuid4()),
        "X-Gitlab-Instance": "https://gitlab.example",
    }
    if token is not None:
        headers["X-Gitlab-Token"] = token
    return Delivery("/hooks/gitlab", headers, body)


# -- the webhook server --------------------------------------------------------------------

INGRESS_READ_TIMEOUT_S = 2.0
INGRESS_MAX_BODY_BYTES = 64 * 1024
SECRETS = {
    "acme/app": {"forge": "github", "secret": "github-secret"},
    "https://github.example/acme/pinned.git": {
        "forge": "github",
        "secret": "pinned-secret",
        "clone_url": "https://git.internal.example/acme/pinned.git",
    },
    "acme/site": {"forge": "gitea", "secret": "gitea-secret"},
    "acme/forgejo-site": {"forge": "forgejo", "secret": "forgejo-secret"},
    "acme/api": {"forge": "gitlab", "secret": "gitlab-token"},
    "acme/nosecret": {"forge": "github", "secret": ""},
}


@dataclass
class Ingress:
    url: str
    http: aiohttp.ClientSession
    port: int = 0

    async def send(self, delivery: Delivery) -> tuple[int, dict[str, Any]]:
        async with self.http.post(
            self.url + delivery.path, data=delivery.body, headers=delivery.headers
        ) as resp:
            return resp.status, await resp.json()


@pytest.fixture
async def ingress(bus: Bus) -> AsyncIterator[Ingress]:
    """The webhook app on a loopback port, publishing through the test's bus."""
    async with serve_ingress(bus, publish_timeout_s=2.0) as served:
        yield served


@contextlib.asynccontextmanager
async def serve_ingress(bus: Bus, *, publish_timeout_s: float) -> AsyncIterator[Ingress]:
    """The webhook app on a loopback port, publishing through `bus`."""
    from niphas_common.service import ServiceRuntime
    from niphas_eval.app import streams_ready

    settings = EvalSettings(role="ingress", publish_timeout_s=publish_timeout_s)
    runtime = ServiceRuntime("eval", bus.settings, bus=bus)
    runtime.ready_when(streams_ready(bus, settings))
    hooks = WebhookIngress(
        bus,
        WebhookSecrets.from_mapping(SECRETS),
        publish_timeout_s=publish_timeout_s,
        read_timeout_s=INGRESS_READ_TIMEOUT_S,
    )
    runner = web.AppRunner(
        hooks.app(runtime.readiness, max_body_bytes=INGRESS_MAX_BODY_BYTES),
        access_log=None,
        keepalive_timeout=INGRESS_READ_TIMEOUT_S,
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as http:
            yield Ingress(f"http://127.0.0.1:{port}", http, port)
    finally:
        await runner.cleanup()
