"""Where workloads live, as the one reconciler sees them: the interface, and what every
implementation shares.

Two implementations: `KubernetesStore` (the API server: NiphasWorkload objects, their
children server-side applied, watches, Events) and `FileStore` (no cluster: workload YAML
files, their status in files, the children rendered as manifests for GitOps). Both answer
with the API's objects (plain dicts) and its rules: every write may carry the
resourceVersion it read and is refused with `KubeConflict` when that is stale; merge patches
follow RFC 7386. The reconciler, the pipeline handlers and the controller are written
against this interface only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from niphas_common.kube.watch import WatchEvent
from niphas_operator.workload import Workload

Key = tuple[str, str]
"""(namespace, name) of a workload, and of each child it owns (they share its name)."""


class WorkloadStore(Protocol):
    pdb_api_version: str
    """Which PodDisruptionBudget version the children use (policy/v1 where served)."""
    pdb_unhealthy_policy: bool
    """Whether the cluster keeps a PDB's `unhealthyPodEvictionPolicy` (Kubernetes >= 1.26
    with its feature gate on); render mode: False."""

    async def get(self, key: Key) -> dict[str, Any] | None:
        """The workload as stored now, or None."""
        ...

    async def list(self) -> list[dict[str, Any]]:
        """Every workload this operator is responsible for."""
        ...

    async def merge_patch(self, key: Key, patch: dict[str, Any]) -> dict[str, Any]:
        """Merge-patch the workload (finalizers, `spec.storePath`); returns the result."""
        ...

    async def merge_patch_status(self, key: Key, patch: dict[str, Any]) -> dict[str, Any]:
        """Merge-patch the workload's status; returns the result."""
        ...

    async def child(self, api_version: str, kind: str, key: Key) -> dict[str, Any] | None:
        """A child as it is now (the Deployment: which store path it runs), or None."""
        ...

    async def workloads_remain(self, namespace: str, besides: str) -> bool:
        """Whether `namespace` holds a workload other than `besides` that is not being
        deleted (read from the store itself, not from a cache: it decides whether what the
        namespace's workloads share can go)."""
        ...

    async def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Make a child exactly `manifest` (no change, no write); returns it as stored."""
        ...

    async def delete(self, api_version: str, kind: str, key: Key) -> None:
        """Remove a child, if there is one."""
        ...

    async def nodes_running(self, workload: Workload) -> tuple[str, ...]:
        """The nodes the workload's pods run on now (none without a cluster)."""
        ...

    async def nodes_labelled(self, labels: dict[str, str]) -> tuple[str, ...] | None:
        """The nodes carrying all of `labels`; None when no cluster can tell."""
        ...

    async def record(
        self, workload: Workload, reason: str, message: str, *, about: str, warning: bool = False
    ) -> None:
        """Tell people about a decision that changed nothing (a Kubernetes Event)."""
        ...

    def workload_events(self) -> AsyncIterator[WatchEvent]:
        """List + watch of the workloads (see `niphas_common.kube.watch`)."""
        ...

    def child_events(self) -> AsyncIterator[WatchEvent]:
        """List + watch of the Deployments the workloads own (their readiness)."""
        ...
