"""Workloads in a Kubernetes cluster: NiphasWorkload objects through the API server.

Children are server-side applied (field manager from the settings, forced) and watched by
the label the operator puts on them; status goes through the status subresource; decisions
that change nothing are recorded as Events (`recorder`). Every request is counted in
`niphas_operator_api_requests_total` (the benchmark's figure).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import Counter

from niphas_common.kube.client import Kube, KubeError, collection_path, object_path, resource_path
from niphas_common.kube.watch import Backoff, Selection, WatchEvent, list_and_watch
from niphas_operator.recorder import Recorder
from niphas_operator.store import Key
from niphas_operator.workload import API_VERSION, MANAGED_BY, PLURAL, Workload

log = logging.getLogger(__name__)

API_REQUESTS = Counter(
    "niphas_operator_api_requests_total", "Kubernetes API requests by verb", ["verb"]
)


REMAIN_PAGE = 20
"""Workloads per page when asking whether a namespace still has one (`workloads_remain`)."""


def count_request(verb: str) -> None:
    API_REQUESTS.labels(verb).inc()


def workloads_path(namespace: str | None) -> str:
    return resource_path(API_VERSION, PLURAL, namespace)


def workload_path(namespace: str, name: str) -> str:
    return resource_path(API_VERSION, PLURAL, namespace, name)


class KubernetesStore:
    def __init__(
        self,
        kube: Kube,
        *,
        namespace: str | None,
        pdb_api_version: str,
        resync_s: float,
        retry: Backoff,
        pdb_unhealthy_policy: bool = False,
    ) -> None:
        self.kube = kube
        self.pdb_api_version = pdb_api_version
        self.pdb_unhealthy_policy = pdb_unhealthy_policy
        self._namespace = namespace
        self._resync_s = resync_s
        self._retry = retry
        self._recorder = Recorder(kube)

    @classmethod
    async def connect(
        cls, kube: Kube, *, namespace: str | None, resync_s: float, retry: Backoff
    ) -> KubernetesStore:
        """A store for the cluster behind `kube`, asking it which PDB version it serves and
        whether it keeps `unhealthyPodEvictionPolicy`."""
        pdb = "policy/v1" if await kube.served("policy/v1") else "policy/v1beta1"
        unhealthy = await keeps_unhealthy_policy(kube, pdb, namespace or "default")
        return cls(
            kube,
            namespace=namespace,
            pdb_api_version=pdb,
            resync_s=resync_s,
            retry=retry,
            pdb_unhealthy_policy=unhealthy,
        )

    async def get(self, key: Key) -> dict[str, Any] | None:
        return await self.kube.get(workload_path(*key))

    async def list(self) -> list[dict[str, Any]]:
        items, _ = await self.kube.list(workloads_path(self._namespace))
        return items

    async def merge_patch(self, key: Key, patch: dict[str, Any]) -> dict[str, Any]:
        return await self.kube.merge_patch(workload_path(*key), patch)

    async def merge_patch_status(self, key: Key, patch: dict[str, Any]) -> dict[str, Any]:
        return await self.kube.merge_patch(f"{workload_path(*key)}/status", patch)

    async def child(self, api_version: str, kind: str, key: Key) -> dict[str, Any] | None:
        return await self.kube.get(object_path(api_version, kind, *key))

    async def workloads_remain(self, namespace: str, besides: str) -> bool:
        # A consistent list (no resourceVersion: read from etcd), a page at a time: the
        # first live workload answers, and most deletions leave one in the first page.
        query = {"limit": str(REMAIN_PAGE)}
        while True:
            page = await self.kube.request("GET", workloads_path(namespace), query=query)
            for item in page.get("items") or []:
                meta = item["metadata"]
                if meta["name"] != besides and not meta.get("deletionTimestamp"):
                    return True
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return False
            query = {"limit": str(REMAIN_PAGE), "continue": token}

    async def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        return await self.kube.apply(manifest)

    async def delete(self, api_version: str, kind: str, key: Key) -> None:
        await self.kube.delete(object_path(api_version, kind, *key))

    async def nodes_running(self, workload: Workload) -> tuple[str, ...]:
        selector = ",".join(f"{k}={v}" for k, v in workload.selector().items())
        pods, _ = await self.kube.list(
            resource_path("v1", "pods", workload.namespace), label_selector=selector
        )
        return tuple(sorted({p["spec"]["nodeName"] for p in pods if p["spec"].get("nodeName")}))

    async def nodes_labelled(self, labels: dict[str, str]) -> tuple[str, ...] | None:
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        nodes, _ = await self.kube.list(resource_path("v1", "nodes"), label_selector=selector)
        return tuple(sorted(n["metadata"]["name"] for n in nodes))

    async def record(
        self, workload: Workload, reason: str, message: str, *, about: str, warning: bool = False
    ) -> None:
        await self._recorder.record(workload, reason, message, about=about, warning=warning)

    def workload_events(self) -> AsyncIterator[WatchEvent]:
        return self._watch(Selection(workloads_path(self._namespace)))

    def child_events(self) -> AsyncIterator[WatchEvent]:
        path = resource_path("apps/v1", "deployments", self._namespace)
        return self._watch(Selection(path, f"app.kubernetes.io/managed-by={MANAGED_BY}"))

    def _watch(self, selection: Selection) -> AsyncIterator[WatchEvent]:
        return list_and_watch(self.kube, selection, resync_s=self._resync_s, retry=self._retry)


async def keeps_unhealthy_policy(kube: Kube, api_version: str, namespace: str) -> bool:
    """Whether the server keeps a PodDisruptionBudget's `unhealthyPodEvictionPolicy`: a
    dry-run create (nothing is stored) answers with the object as it would be stored, and a
    server without the field (before 1.26, or its feature gate off) drops it."""
    probe = {
        "apiVersion": api_version,
        "kind": "PodDisruptionBudget",
        "metadata": {"generateName": "niphas-probe-"},
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": {"niphas.io/probe": "unhealthy-pod-eviction-policy"}},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }
    path = collection_path(api_version, "PodDisruptionBudget", namespace)
    try:
        answer = await kube.request("POST", path, query={"dryRun": "All"}, body=probe)
    except KubeError as exc:
        log.warning("cannot tell whether PDBs keep unhealthyPodEvictionPolicy: %s", exc)
        return False
    kept = (answer.get("spec") or {}).get("unhealthyPodEvictionPolicy") == "AlwaysAllow"
    log.info("PodDisruptionBudget unhealthyPodEvictionPolicy %s", "kept" if kept else "dropped")
    return kept
