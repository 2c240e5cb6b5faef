"""The reporter's settings (environment variables `NIPHAS_REPORTER_*`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from niphas_common.settings import ServiceSettings


class ReporterSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="NIPHAS_REPORTER_", extra="ignore")

    credentials_file: Path | None = Field(
        default=None,
        description="The per-repository credentials file, the same format (and in a cluster the "
        "same Secret, niphas-git-credentials) as NIPHAS_EVAL_GIT_CREDENTIALS_FILE; an entry's "
        "token posts the statuses, its `forge` and `api_url` say where. None or missing: no "
        "statuses are posted",
    )
    public_url: str = Field(
        default="http://127.0.0.1:8095",
        pattern=r"^https?://\S+$",
        description="Base URL people reach this reporter at: a build status links to "
        "<public_url>/logs/drv/<hash>",
    )
    http_host: str = Field(
        default="127.0.0.1",
        description="Address of the logs HTTP server (the manifests set 0.0.0.0)",
    )
    http_port: int = Field(
        default=8095,
        ge=0,
        le=65535,
        description="Port of the logs HTTP server (also /healthz, /readyz, /metrics)",
    )
    logs_token_file: Path | None = Field(
        default=None,
        description="File holding a token the logs server asks for (`Authorization: Bearer "
        "<token>`, else 403); None: logs are readable by whoever reaches the server",
    )
    durable_prefix: str = Field(
        default="reporter",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Prefix of the durable consumers (<prefix>-push, -eval, -build, -deploy)",
    )
    context_prefix: str = Field(
        default="niphas",
        min_length=1,
        max_length=64,
        description="First part of every status context (niphas/eval, niphas/build/<attr>, "
        "niphas/deploy/<namespace>/<name>)",
    )
    attempts: int = Field(
        default=6,
        ge=1,
        le=50,
        description="Tries per status while the forge is down or answers 5xx/429; then the "
        "status is dropped (counted, logged): a forge never holds up the pipeline",
    )
    backoff_s: float = Field(
        default=1.0, gt=0, description="Seconds before the first retry; doubled per retry"
    )
    backoff_max_s: float = Field(default=60.0, gt=0, description="Longest wait between retries")
    request_timeout_s: float = Field(
        default=10.0, gt=0, description="Seconds one request to a forge may take"
    )
    queue_size: int = Field(
        default=10000,
        ge=1,
        description="Statuses waiting per forge; beyond it new ones are dropped (counted)",
    )
