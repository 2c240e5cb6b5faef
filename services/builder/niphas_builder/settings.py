"""The builder's settings (environment variables `NIPHAS_BUILDER_*`)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from niphas_common.settings import ServiceSettings


class BuilderSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="NIPHAS_BUILDER_", extra="ignore")

    name: str = Field(
        default_factory=socket.gethostname,
        description="This builder's name: lease holder and `built_on` of local builds",
    )
    durable: str = Field(default="builder", description="Durable consumer name on eval.done")
    ack_wait_s: float = Field(
        default=60.0,
        gt=0,
        description="Seconds before an unacknowledged eval.done goes to another builder; long "
        "builds are kept alive by in-progress acks, so this bounds only a dead builder's delay",
    )
    max_deliver: int = Field(default=8, ge=1, description="Deliveries before dead-lettering")
    max_parallel_builds: int = Field(
        default=2,
        ge=1,
        le=256,
        description="Builds this process runs at once; the rest wait (and may be superseded)",
    )
    build_timeout_s: float = Field(
        default=3600.0, gt=0, description="Seconds one derivation may build before it fails"
    )
    lease_ttl_s: float = Field(
        default=60.0,
        ge=1.0,
        description="Seconds a build lease lives without renewal (renewed every third of it): "
        "how long a killed builder blocks others, and how long a result stays in the KV",
    )
    cache_url: str | None = Field(
        default=None,
        description="Binary cache to push to: any store URI `nix copy --to` accepts (file://, "
        "s3://, ...). Default: file://<state_dir>/cache, served by the mesh agent",
    )
    cache_read_url: str | None = Field(
        default=None,
        description="Where to read the cache back (file:// or http(s)://) to skip what it "
        "holds; default: cache_url. Also the holder_url announced in path.available",
    )
    cache_token_file: Path | None = Field(
        default=None,
        description="File holding the upload token of an http(s) cache (the in-cluster cache: "
        "Secret niphas-cache-upload, key token). nix sends it as HTTP basic auth from a netrc "
        "the builder writes at start (<state_dir>/builder/cache-netrc); None: no credentials",
    )
    compression: Literal["zstd", "none"] = Field(
        default="zstd", description="NAR compression in the cache (never xz: ~100x slower)"
    )
    secret_key_file: Path | None = Field(
        default=None,
        description="The cluster signing key in Nix format (`nix key generate-secret`). Default: "
        "<state_dir>/builder/cache-key.sec, generated (with .pub beside it) when missing",
    )
    trusted_public_keys: str = Field(
        default="",
        description="More public keys (space-separated, Nix format) whose signatures count "
        "when deciding a path is already cached; the signing key's own always counts",
    )
    store: str | None = Field(
        default=None, description="`--store` for nix (a simulated node's store); None: the host's"
    )
    log_tail_lines: int = Field(
        default=60, ge=1, le=2000, description="Build log lines kept in a failed build.done"
    )
    logs: bool = Field(
        default=True,
        description="Keep each build's full log in the stream BUILD_LOGS (read with `niphas "
        "logs`, served by the reporter); False: only the tail in a failed build.done",
    )
    log_max_bytes: int = Field(
        default=8 * 1024**2,
        ge=1024,
        description="Bytes of one build's log kept; past it the output is counted, not kept, "
        "and the log's last 64 KiB are added after a line saying so",
    )
    logs_max_bytes: int = Field(
        default=1024**3,
        ge=1024**2,
        description="Bytes the log stream keeps in all; the oldest logs go first",
    )
    logs_max_age_days: float = Field(default=14.0, gt=0, description="Days a build log is kept")
    supersede: bool = Field(
        default=True,
        description="Skip queued builds of a commit once a newer commit of the same ref arrived "
        "(published as failed, log tail `superseded by <commit>`)",
    )
    cancel_superseded: bool = Field(
        default=True,
        description="With supersede: also cancel running builds of a commit once a newer "
        "commit of the same ref arrived that does not need the derivation (the local nix is "
        "killed, the Job deleted; published as failed, `superseded by <commit>: cancelled "
        "while building`)",
    )
    cancel_check_s: float = Field(
        default=2.0,
        gt=0,
        description="Seconds between looks at the ref's head while a build runs",
    )
    executor: Literal["local", "kubernetes"] = Field(
        default="local",
        description="`local`: nix-store --realise on this node; `kubernetes`: one Job per build",
    )

    # -- the Kubernetes executor -------------------------------------------------------------
    k8s_namespace: str = Field(default="niphas-system", description="Namespace of build Jobs")
    k8s_image: str = Field(
        default="nixos/nix:2.24.9",
        description="Image of the build pod: needs nix (nix, nix-store), a POSIX shell, the "
        "nixbld group with build users, and CA certificates for https caches",
    )
    k8s_cpu_request: str = Field(default="500m", description="CPU request of a build pod")
    k8s_cpu_limit: str = Field(default="2", description="CPU limit of a build pod")
    k8s_memory_request: str = Field(default="512Mi", description="Memory request of a build pod")
    k8s_memory_limit: str = Field(default="4Gi", description="Memory limit of a build pod")
    k8s_backoff_limit: int = Field(
        default=0, ge=0, description="Job retries: a Nix build failure is deterministic"
    )
    k8s_ttl_after_finished_s: int = Field(
        default=3600,
        ge=0,
        description="Seconds a finished Job is kept if the builder died before deleting it",
    )
    k8s_store_dir: str = Field(
        default="/niphas-store",
        description="Where the build pod's own, ephemeral Nix store lives (an emptyDir used as "
        "a chroot store): builds never touch a store that workloads run from",
    )
    k8s_shell: str = Field(
        default="/bin/sh",
        description="Shell in the build image that runs the pod's script (`<shell> -c <script>`)",
    )
    k8s_service_account: str = Field(
        default="niphas-build", description="Service account of build pods (no API access)"
    )
    staging_url: str | None = Field(
        default=None,
        description="Base URL build pods upload their outputs to (this builder's staging "
        "endpoint, e.g. http://<pod IP>:8090); default http://<name>:<staging_port>",
    )
    staging_host: str = Field(default="0.0.0.0", description="Address of the staging endpoint")
    staging_port: int = Field(
        default=8090, ge=0, le=65535, description="Port of the staging endpoint (kubernetes)"
    )
    staging_max_nar_bytes: int = Field(
        default=16 * 1024**3, ge=1, description="Largest NAR file (bytes) a build pod may upload"
    )
    kubeconfig: Path | None = Field(
        default=None, description="kubeconfig file; None: in-cluster service account"
    )

    @property
    def push_url(self) -> str:
        return self.cache_url or f"file://{self.state_dir / 'cache'}"

    @property
    def read_url(self) -> str:
        return self.cache_read_url or self.push_url.partition("?")[0]

    @property
    def cache_netrc_file(self) -> Path:
        return self.state_dir / "builder" / "cache-netrc"

    @property
    def staging_base_url(self) -> str:
        return self.staging_url or f"http://{self.name}:{self.staging_port}"

    @property
    def key_file(self) -> Path:
        return self.secret_key_file or self.state_dir / "builder" / "cache-key.sec"
