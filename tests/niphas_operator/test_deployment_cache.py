"""The Deployment cache (`niphas_operator.deployment_cache`): what the Deployment watch and
the reconciler's own applies showed, answered only once the watch has listed, older copies
ignored; and the reconciler using it on a real kube-apiserver: a first attempt reads no
Deployment the watch already delivered, a retry reads afresh, and a Deployment moved by
someone else is still announced as moved when the reconciler puts it back."""

from __future__ import annotations

import json
from typing import Any

import pytest

from niphas_common.bus.bus import Bus
from niphas_common.kube.client import Kube
from niphas_common.kube.watch import LISTED, SYNCED, Backoff, WatchEvent
from niphas_operator.app import reconciler
from niphas_operator.deployment_cache import UNKNOWN, DeploymentCache
from niphas_operator.kubernetes_store import KubernetesStore
from niphas_operator.settings import OperatorSettings
from niphas_operator.store import Key
from niphas_operator.workload import Workload
from tests.kube_harness import KubeApiServer
from tests.niphas_operator.conftest import Kubectl, store_path, workload


def deployment(name: str, path: str, *, generation: int = 1, uid: str = "u1") -> dict[str, Any]:
    return {
        "metadata": {"namespace": "ns", "name": name, "uid": uid, "generation": generation},
        "spec": {"template": {"metadata": {"annotations": {"niphas.io/store-path": path}}}},
    }


def test_nothing_is_known_before_the_first_list_is_complete() -> None:
    cache = DeploymentCache()
    cache.observe(WatchEvent(LISTED, deployment("web", "/nix/store/a")))
    assert cache.store_path(("ns", "web")) is UNKNOWN
    cache.observe(WatchEvent(SYNCED))
    assert cache.store_path(("ns", "web")) == "/nix/store/a"
    assert cache.store_path(("ns", "other")) is None


def test_an_older_copy_of_the_same_deployment_is_ignored() -> None:
    cache = DeploymentCache()
    cache.observe(WatchEvent(SYNCED))
    cache.applied(deployment("web", "/nix/store/b", generation=2))
    cache.observe(WatchEvent("MODIFIED", deployment("web", "/nix/store/a", generation=1)))
    assert cache.store_path(("ns", "web")) == "/nix/store/b"
    # A new object of the same name starts its generations again.
    cache.observe(WatchEvent("ADDED", deployment("web", "/nix/store/c", uid="u2")))
    assert cache.store_path(("ns", "web")) == "/nix/store/c"


def test_deleted_forgotten_and_relisted_deployments_are_gone() -> None:
    cache = DeploymentCache()
    cache.observe(WatchEvent(LISTED, deployment("a", "/nix/store/a")))
    cache.observe(WatchEvent(LISTED, deployment("b", "/nix/store/b")))
    cache.observe(WatchEvent(LISTED, deployment("c", "/nix/store/c")))
    cache.observe(WatchEvent(SYNCED))
    cache.observe(WatchEvent("DELETED", deployment("a", "/nix/store/a")))
    cache.forget(("ns", "b"))
    assert cache.store_path(("ns", "a")) is None
    assert cache.store_path(("ns", "b")) is None
    # A relist is the whole truth: what it no longer holds is gone; until it is complete
    # nothing is known (the broken watch may have missed changes).
    cache.observe(WatchEvent(LISTED, deployment("d", "/nix/store/d")))
    assert cache.store_path(("ns", "c")) is UNKNOWN
    cache.observe(WatchEvent(SYNCED))
    assert cache.store_path(("ns", "c")) is None
    assert cache.store_path(("ns", "d")) == "/nix/store/d"
    cache.reset()  # a new term of leadership
    assert cache.store_path(("ns", "d")) is UNKNOWN


class CountingStore(KubernetesStore):
    """The real store, counting the Deployment reads and the Events of moves."""

    reads = 0
    moves: list[str]

    async def child(self, api_version: str, kind: str, key: Key) -> dict[str, Any] | None:
        if kind == "Deployment":
            self.reads += 1
        return await super().child(api_version, kind, key)

    async def record(
        self, workload: Workload, reason: str, message: str, *, about: str, warning: bool = False
    ) -> None:
        if reason in ("Provisioned", "RolledBack"):
            self.moves.append(message)
        await super().record(workload, reason, message, about=about, warning=warning)


@pytest.mark.slow
async def test_the_reconciler_takes_deployments_from_the_watch_and_retries_read_afresh(
    crd: KubeApiServer, kubectl: Kubectl, bus: Bus, operator_settings: OperatorSettings
) -> None:
    ns, path = kubectl.namespace, store_path("web-1.0")
    kubectl.apply(workload("web", storePath=path))
    async with Kube(crd.api_client(), "niphas-operator") as kube:
        store = CountingStore(
            kube, namespace=ns, pdb_api_version="policy/v1", resync_s=300, retry=Backoff(0.1, 1)
        )
        store.moves = []
        rec = reconciler(operator_settings, store, bus)
        async for event in store.child_events():
            rec.deployments.observe(event)  # the (empty) list of the test's namespace
            if event.kind == SYNCED:
                break

        await rec.reconcile(ns, "web", await store.get((ns, "web")))
        assert store.reads == 0
        assert len(store.moves) == 1  # the move to the pinned path, announced once
        running = kubectl.get("deployment", "web") or {}
        assert (
            running["spec"]["template"]["metadata"]["annotations"]["niphas.io/store-path"] == path
        )

        await rec.reconcile(ns, "web", await store.get((ns, "web")))
        assert (store.reads, len(store.moves)) == (0, 1)  # nothing moved

        # Someone else points the Deployment elsewhere; the watch delivers it.
        other = store_path("web-0.9")
        moved = {"niphas.io/store-path": other}
        patch = {"spec": {"template": {"metadata": {"annotations": moved}}}}
        kubectl("patch", "deployment", "web", "--type=merge", "-p", json.dumps(patch))
        rec.deployments.observe(WatchEvent("MODIFIED", kubectl.get("deployment", "web") or {}))
        await rec.reconcile(ns, "web", await store.get((ns, "web")))
        assert store.reads == 0
        assert len(store.moves) == 2  # put back, and said so

        await rec.reconcile(ns, "web")  # a retry: no watch copy, read everything afresh
        assert store.reads == 1
