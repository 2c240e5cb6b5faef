"""The operator's settings (environment, prefix `NIPHAS_OPERATOR_`)."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import ClassVar

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from niphas_common.settings import ServiceSettings
from niphas_operator.children import PodSettings

log = logging.getLogger(__name__)


def _default_identity() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class OperatorSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="NIPHAS_OPERATOR_", extra="ignore")
    default_metrics_host: ClassVar[str] = "127.0.0.1"
    """The ops server stays on loopback unless the Deployment says otherwise (0.0.0.0)."""

    kubeconfig: Path | None = Field(
        default=None,
        description="kubeconfig file of the cluster to reconcile; None: KUBECONFIG, then the "
        "in-cluster service account, else render mode (no cluster)",
    )
    namespace: str | None = Field(
        default=None, description="Watch only this namespace; None: every namespace"
    )
    render_dir: Path | None = Field(
        default=None,
        description="Render mode: write the manifests the operator would apply under this "
        "directory (<namespace>/<name>/*.yaml) for GitOps; default <state_dir>/operator/render",
    )
    status_dir: Path | None = Field(
        default=None,
        description="Render mode: directory of each workload's status (and rollback pin), "
        "one JSON file per workload beside a lock file; default <state_dir>/operator/status",
    )
    workloads_dir: Path | None = Field(
        default=None,
        description="Render mode: directory of NiphasWorkload YAML files to render; default "
        "<state_dir>/operator/workloads",
    )
    stub_image: str = Field(
        default="registry.k8s.io/pause:3.9",
        description="The fixed image every pod's container uses; the closure brings everything "
        "else. Never changes with the app",
    )
    csi_driver: str = Field(default="csi.niphas.io", description="CSI driver of the closure mount")
    store_node_label: str = Field(
        default="niphas.io/store=true",
        description="key=value merged into every pod's nodeSelector: nodes running csi and mesh",
    )
    not_ready_toleration_s: int = Field(
        default=60,
        ge=0,
        description="Seconds a pod stays on a node that became not ready or unreachable before "
        "it is evicted (tolerations of node.kubernetes.io/not-ready and /unreachable); a "
        "workload's own toleration of either taint wins",
    )
    ca_bundle_file: Path | None = Field(
        default=Path("/etc/ssl/certs/ca-certificates.crt"),
        description="PEM CA certificates given to every pod as /etc/ssl/certs/"
        "ca-certificates.crt (and SSL_CERT_FILE); none, or a missing file: pods get no CA "
        "certificates",
    )
    field_manager: str = Field(
        default="niphas-operator", description="Server-side apply field manager"
    )
    identity: str = Field(
        default_factory=_default_identity,
        description="This replica's name in the leader Lease (default hostname-pid)",
    )
    lease_name: str = Field(default="niphas-operator", description="Leader election Lease name")
    lease_namespace: str = Field(
        default="niphas-system", description="Namespace of the leader election Lease"
    )
    lease_duration_s: float = Field(
        default=15.0,
        gt=0,
        description="Seconds a leader's Lease stays valid without renewal: the longest pause "
        "after a leader dies before another replica takes over",
    )
    renew_period_s: float = Field(
        default=5.0,
        gt=0,
        description="Seconds between Lease renewals (and standby attempts); well below the "
        "duration so one slow request does not lose leadership",
    )
    api_compression: bool = Field(
        default=False,
        description="Ask the API server for gzip-compressed responses. Off: in a cluster the "
        "gzip of each large object (the pods' CA bundle ConfigMap) costs the API server more "
        "CPU than the bytes cost the network (client-go's DisableCompression)",
    )
    workers: int = Field(
        default=4, ge=1, le=256, description="Workloads reconciled at once (never one twice)"
    )
    retry_base_s: float = Field(
        default=0.5, gt=0, description="First retry delay of a failed reconcile, doubled each time"
    )
    retry_max_s: float = Field(default=60.0, gt=0, description="Longest retry delay (seconds)")
    resync_s: float = Field(
        default=300.0,
        gt=0,
        description="Seconds between full relists: level-triggered repair of anything missed",
    )
    preheat_nodes: tuple[str, ...] = Field(
        default=(),
        description="Nodes that get path.wanted before a rollout (JSON list). Empty: the nodes "
        "the workload's pods run on now",
    )
    preheat_deadline_s: float = Field(
        default=300.0, gt=0, description="Deadline given in path.wanted, seconds from now"
    )
    build_consumer: str = Field(
        default="operator-build-done", description="Durable consumer name on build.done"
    )
    eval_consumer: str = Field(
        default="operator-eval-done", description="Durable consumer name on eval.done"
    )

    def resolved_render_dir(self) -> Path:
        return self.render_dir or self.state_dir / "operator" / "render"

    def resolved_status_dir(self) -> Path:
        return self.status_dir or self.state_dir / "operator" / "status"

    def resolved_workloads_dir(self) -> Path:
        return self.workloads_dir or self.state_dir / "operator" / "workloads"

    def pod(self) -> PodSettings:
        """What the operator adds to every pod it runs."""
        key, _, value = self.store_node_label.partition("=")
        return PodSettings(
            self.stub_image,
            self.csi_driver,
            (key, value),
            not_ready_toleration_s=self.not_ready_toleration_s,
            ca_bundle=self._ca_bundle(),
        )

    def _ca_bundle(self) -> str | None:
        if self.ca_bundle_file is None:
            return None
        try:
            return self.ca_bundle_file.read_text()
        except OSError as exc:
            log.warning("pods get no CA certificates: %s", exc)
            return None
