"""The csi service's settings (environment prefix `NIPHAS_CSI_`, or the `niphas csi` flags)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from niphas_common.settings import ServiceSettings

DRIVER_NAME = "csi.niphas.io"
"""The CSI driver name: the CSIDriver object, the registrar and every pod's volume use it."""


class CsiSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="NIPHAS_CSI_", extra="ignore")
    default_metrics_host: ClassVar[str] = "127.0.0.1"
    """The ops server stays on the node's loopback unless the DaemonSet says otherwise."""

    endpoint: str | None = Field(
        default=None,
        description="gRPC endpoint kubelet calls (unix:///path/csi.sock; the socket file is "
        "replaced at start); None: unix://<state_dir>/csi/csi.sock",
    )
    node_id: str = Field(
        default="localhost",
        description="This node's name (the Kubernetes node name): NodeGetInfo's node id and the "
        "node asked for in path.wanted",
    )
    store_root: Path | None = Field(
        default=None,
        description="Root of the node's Nix store as `nix --store` takes it (a chroot store "
        "dir); None: the host store at /nix/store",
    )
    registration_dir: Path | None = Field(
        default=None,
        description="kubelet's plugin registration dir (<kubelet root>/plugins_registry): once "
        "the CSI socket answers, the driver serves kubelet's registration API on "
        f"<dir>/{DRIVER_NAME}-reg.sock; None: no registration (the driver is registered by "
        "other means, or not at all)",
    )
    kubelet_socket: Path | None = Field(
        default=None,
        description="The CSI socket's path as kubelet sees it on the host (what the "
        "registration tells kubelet to dial); None: the endpoint's own path (a host process, "
        "or a container that mounts the socket dir at the host's path)",
    )
    registration_check_s: float = Field(
        default=10.0,
        gt=0,
        description="Seconds between checks that the registration socket is still in place; "
        "a removed one is offered again (kubelet then registers the driver again)",
    )
    allowed_target_root: Path = Field(
        default=Path("/var/lib/kubelet/pods"),
        description="Volumes are only ever mounted below this directory (kubelet's pods dir); "
        "any other target path is refused with INVALID_ARGUMENT",
    )
    fetch_timeout_s: float = Field(
        default=100.0,
        gt=0,
        description="Seconds a publish waits for missing paths (path.wanted -> path.available) "
        "before DEADLINE_EXCEEDED; kept under kubelet's 2-minute call timeout",
    )
    presence_recheck_s: float = Field(
        default=2.0,
        gt=0,
        description="Seconds between re-checks of the store while waiting for missing paths, "
        "in case an announcement was missed",
    )
    max_concurrent_rpcs: int = Field(
        default=64,
        ge=1,
        description="gRPC calls served at once; beyond it calls fail with RESOURCE_EXHAUSTED "
        "and kubelet retries (thousands of unbounded calls get CANCELLED)",
    )
    store_db_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Seconds a read of the store's Nix database (which paths are valid, their "
        "closure) may wait for a lock Nix holds (SQLite's busy timeout); in WAL mode, Nix's "
        "default, readers wait only while the database recovers from a crash",
    )
