"""The eval service's settings: environment variables with the prefix `NIPHAS_EVAL_`.

Every field has a default and says its unit. Lists (`ALLOWED_REFS`) are read from the
environment as comma- or whitespace-separated text, or as a JSON list.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from niphas_common.settings import ServiceSettings


def this_system() -> str:
    """The Nix system double of this machine (`x86_64-linux`, `aarch64-linux`, ...)."""
    machine = platform.machine().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    return f"{machine}-{platform.system().lower()}"


Role = Literal["all", "ingress", "workers"]


class EvalSettings(ServiceSettings):
    model_config = SettingsConfigDict(
        env_prefix="NIPHAS_EVAL_", extra="ignore", populate_by_name=True
    )

    role: Role = Field(
        default="all",
        description="What this process runs: `ingress` (webhooks -> push.received), `workers` "
        "(push.received -> eval.done) or `all` (both: the embedded default). In a cluster run "
        "them as two Deployments so each scales on its own",
    )
    listen: str = Field(
        default="127.0.0.1:8470",
        pattern=r"^\[?[A-Za-z0-9.:\-]*\]?:\d{1,5}$",
        description="HOST:PORT of the webhook server (with /healthz, /readyz, /metrics). "
        "In a pod bind 0.0.0.0 (the Deployment listens on 0.0.0.0:8080)",
    )
    event_loop: Literal["uvloop", "asyncio"] = Field(
        default="uvloop",
        description="The event loop `niphas eval` runs on: `uvloop` (libuv; less CPU per "
        "webhook delivery than asyncio's own, bench/bench_eval.py) or `asyncio`",
    )
    # -- ingress ---------------------------------------------------------------------------
    webhook_secrets_file: Path | None = Field(
        default=None,
        description="YAML or JSON file mapping repository -> {forge, secret | secret_env, "
        "clone_url?} (see README). Re-read when it changes, so a mounted Secret can rotate",
    )
    webhook_secrets: str | None = Field(
        default=None,
        description="The same mapping as JSON text, for setups without a file; merged under "
        "the file's entries",
    )
    max_body_bytes: int = Field(
        default=25 * 1024 * 1024,
        ge=1024,
        description="Largest webhook body accepted, in bytes (GitHub caps payloads at 25 MB); "
        "larger -> 413",
    )
    read_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Seconds a client has to send a webhook's body, and that an idle "
        "keep-alive connection is kept; a slower or stalled client gets 408 or is "
        "disconnected (forges send a whole body at once)",
    )
    publish_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="Seconds to wait for JetStream's acknowledgement before answering 503 (the "
        "forge then retries); forges give up on a hook after ~10 s",
    )
    # -- workers ---------------------------------------------------------------------------
    concurrency: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Evaluations run at once per worker process (each is one `nix eval` that "
        "may use up to MEMORY_LIMIT_MB)",
    )
    allowed_refs: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Deny-by-default allowlist: fnmatch globs over the repository URL or its "
        "flake ref (`git+<url>`), e.g. `https://git.example.com/acme/*`. Every input in a "
        "pushed flake's flake.lock must match too (`path:` inputs only as "
        "`path:/nix/store/...`, never host directories). Empty: nothing is evaluated (every "
        "push gets a failed eval.done saying so)",
    )
    allow_import_from_derivation: bool = Field(
        default=False,
        description="Let evaluation build derivations it imports from (IFD). Risk: those "
        "builds run on the worker, during evaluation, with the pushed code as builder "
        "(sandboxed when the worker's Nix can sandbox: sandbox-fallback is off, so a host "
        "without user namespaces fails them instead). Off: such a flake gets a failed "
        "eval.done naming import-from-derivation and this setting",
    )
    git_credentials_file: Path | None = Field(
        default=None,
        description="YAML or JSON file mapping a private repository's URL (or a URL prefix "
        "ending /) -> {username?, token | token_file} for http(s), or {ssh_key_file, "
        "known_hosts_file} for ssh (see README); each evaluation gets the credentials of the "
        "repositories it fetches, as files. Re-read when it changes (a mounted Secret)",
    )
    drv_upload_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^/?#@\s]+/?$",
        description="In a cluster: base URL of the in-cluster binary cache (the niphas-cache "
        "Service, http://niphas-cache:8080) to which each successful evaluation uploads the "
        "derivation closure of its attributes (.drv files and sources, content-addressed: "
        "accepted without a signature), so build pods need neither the forge nor its "
        "credentials. None: off (one machine, where the builder shares the worker's store)",
    )
    drv_upload_token_file: Path | None = Field(
        default=None,
        description="File holding the cache's upload token (Secret niphas-cache-upload, key "
        "token), sent as HTTP basic auth from a netrc written per upload; read on each "
        "upload. None: uploads carry no credentials",
    )
    drv_upload_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="Seconds one upload may take; past it (or on any failure) eval.done is "
        "published without it and build pods evaluate the flake themselves",
    )
    system: str = Field(
        default_factory=this_system,
        pattern=r"^[a-z0-9_]+-[a-z0-9_]+$",
        description="The Nix system whose `packages.<system>` are evaluated",
    )
    eval_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="Seconds one evaluation may take; then nix is stopped (SIGTERM, SIGKILL 5 s "
        "later) and a failed eval.done says so",
    )
    memory_limit_mb: int = Field(
        default=4096,
        ge=0,
        description="Address-space limit of each `nix eval`, in MiB (RLIMIT_AS through "
        "`prlimit`); past it nix fails with `out of memory` and the eval fails. 0: no limit",
    )
    stderr_tail_bytes: int = Field(
        default=8192,
        ge=256,
        le=60000,
        description="How much of the end of nix's stderr a failed eval.done keeps, in bytes",
    )
    git_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="Seconds for `git ls-remote` when a push names a ref but no commit",
    )
    durable: str = Field(
        default="eval-workers",
        pattern=r"^[A-Za-z0-9_\-]+$",
        description="Durable consumer of push.received shared by every worker replica",
    )
    ack_wait_s: float = Field(
        default=30.0,
        gt=0,
        description="Seconds JetStream waits for an ack before redelivering; running "
        "evaluations send in-progress acks every third of it",
    )
    max_deliver: int = Field(
        default=5,
        ge=1,
        description="Deliveries of one push before giving up; a push that still cannot be "
        "fetched then gets a failed eval.done",
    )
    results_bucket: str = Field(
        default="eval-results",
        pattern=r"^[A-Za-z0-9_\-]+$",
        description="JetStream key-value bucket remembering which (repository, commit) were "
        "evaluated, so a redelivery never evaluates twice",
    )
    results_ttl_days: float = Field(
        default=30.0,
        gt=0,
        description="Days an evaluation is remembered; after that a new push of the same "
        "commit is evaluated again",
    )

    @field_validator("allowed_refs", mode="before")
    @classmethod
    def _split_patterns(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [p for p in text.replace(",", " ").split() if p]
        return value

    @property
    def listen_host(self) -> str:
        host, _, _ = self.listen.rpartition(":")
        return host.strip("[]") or "0.0.0.0"

    @property
    def listen_port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @property
    def runs_ingress(self) -> bool:
        return self.role in ("all", "ingress")

    @property
    def runs_workers(self) -> bool:
        return self.role in ("all", "workers")
