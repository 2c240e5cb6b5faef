"""Settings shared by every service, read from the environment (pydantic-settings).

Each service declares its own `ServiceSettings` subclass with the prefix `NIPHAS_<SERVICE>_`;
the settings here are the ones every process needs: where NATS is and how to log.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ELECTION_WAIT_S = 30.0


def default_state_dir() -> Path:
    """Where the embedded default keeps its data (NATS store, cache, leases): NIPHAS_STATE_DIR
    (which `niphas up` sets for every service it starts), else the XDG state directory."""
    import os

    if explicit := os.environ.get("NIPHAS_STATE_DIR"):
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "niphas"


class NatsSettings(BaseSettings):
    """How to reach NATS. With no URL, `niphas up` starts an embedded server."""

    model_config = SettingsConfigDict(
        env_prefix="NIPHAS_NATS_", extra="ignore", populate_by_name=True
    )

    url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("NIPHAS_NATS_URL", "NATS_URL"),
        description="Server URL(s), comma-separated (nats://host:4222). Also read from NATS_URL.",
    )
    user: str | None = Field(default=None, description="User name for user/password auth")
    password: str | None = Field(default=None, description="Password for user/password auth")
    token: str | None = Field(default=None, description="Token auth")
    creds_file: Path | None = Field(default=None, description="A .creds file (JWT + NKey seed)")
    tls_ca_file: Path | None = Field(default=None, description="CA bundle to verify the server")
    tls_cert_file: Path | None = Field(default=None, description="Client certificate (mTLS)")
    tls_key_file: Path | None = Field(default=None, description="Client key (mTLS)")
    connect_timeout_s: float = Field(default=5.0, gt=0, description="Seconds per connect attempt")
    duplicate_window_s: float = Field(
        default=900.0,
        gt=0,
        description="Seconds a Nats-Msg-Id is remembered per stream: a forge's redelivery or a "
        "re-sent event inside this window is stored once",
    )
    push_duplicate_window_s: float = Field(
        default=7 * 86400.0,
        gt=0,
        description="Seconds a webhook delivery id is remembered in push.received: a forge "
        "re-sending an old delivery (a retry, a manual redeliver) is stored once instead of "
        "passing as a new push of an older commit (bounded by max_age_days)",
    )
    max_age_days: float = Field(
        default=7.0, gt=0, description="Days events stay in a stream (they can be inspected)"
    )
    replicas: int = Field(
        default=1, ge=1, le=5, description="Stream replicas (3 on a clustered NATS)"
    )
    publish_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="Seconds a publish waits for JetStream's acknowledgement; then it fails "
        "with an error naming the stream (on a cluster that lost quorum the stream has no "
        "leader, and a publish would otherwise wait for ever)",
    )
    election_wait_s: float = Field(
        default=ELECTION_WAIT_S,
        gt=0,
        description="Seconds a JetStream request that provisions streams and consumers is "
        "tried again while it times out or is answered 503: on a cluster that just lost a "
        "server, leaders are elected again, which takes several seconds",
    )
    cluster_size: int = Field(
        default=1,
        ge=1,
        le=5,
        description="Servers of the NATS that `niphas up` embeds when no URL is given: 1 is "
        "one server; 3 starts a JetStream cluster on loopback (routed servers, one store "
        "each) and makes streams and buckets 3 replicas, as on a production cluster",
    )


class CommonSettings(BaseSettings):
    """Settings of the `niphas` command itself."""

    model_config = SettingsConfigDict(env_prefix="NIPHAS_", extra="ignore")

    state_dir: Path = Field(
        default_factory=default_state_dir,
        description="Where `niphas up` keeps the embedded NATS data and the services' state",
    )


class LogSettings(BaseSettings):
    """Logging for every process."""

    model_config = SettingsConfigDict(env_prefix="NIPHAS_LOG_", extra="ignore")

    level: str = Field(default="INFO", description="Root log level (DEBUG, INFO, WARNING...)")
    format: str = Field(
        default="text",
        pattern="^(text|json)$",
        description="`text` for people, `json` for log pipelines (one object per line)",
    )


class ServiceSettings(BaseSettings):
    """Base class of each service's settings; subclasses set `env_prefix=NIPHAS_<SERVICE>_`."""

    model_config = SettingsConfigDict(extra="ignore")

    state_dir: Path = Field(
        default_factory=default_state_dir,
        description="Directory for this service's durable local state (default: "
        "NIPHAS_STATE_DIR, which `niphas up` sets, else ~/.local/state/niphas)",
    )
    concurrency: int = Field(
        default=8, ge=1, le=1024, description="Events handled at once per process"
    )
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="Port of the /healthz /readyz /metrics server; None: no such server (a "
        "service with its own HTTP app serves them there too)",
    )
    metrics_host: str = Field(
        default="",
        description="Address the /healthz /readyz /metrics server binds; empty: the service's "
        "default, 0.0.0.0 for eval and builder (probed and scraped in their pods), 127.0.0.1 "
        "for csi, mesh and operator (node-local; manifests that need it set 0.0.0.0)",
    )

    default_metrics_host: ClassVar[str] = "0.0.0.0"
    """What an empty `metrics_host` means for this service."""

    @model_validator(mode="after")
    def _default_metrics_host(self) -> ServiceSettings:
        if not self.metrics_host:
            self.metrics_host = type(self).default_metrics_host
        return self
