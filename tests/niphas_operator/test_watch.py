"""Watching from a resourceVersion: the real apiserver answers a compacted version with 410
Gone, and the shared list + watch stream (`niphas_common.kube.watch`) relists on it, so the
controller misses nothing between the stale version and now."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from niphas_common.bus.bus import Bus
from niphas_common.kube.client import Gone, Kube
from niphas_common.kube.watch import Backoff
from niphas_operator.app import reconciler
from niphas_operator.controller import Controller
from niphas_operator.kubernetes_store import KubernetesStore, workloads_path
from niphas_operator.settings import OperatorSettings
from tests.helpers import eventually
from tests.kube_harness import KubeApiServer
from tests.niphas_operator.conftest import Kubectl, store_path, workload

pytestmark = pytest.mark.slow


async def test_a_compacted_resource_version_is_gone(crd: KubeApiServer, kubectl: Kubectl) -> None:
    kubectl.apply(workload("web", storePath=store_path("web-1.0")))
    async with Kube(crd.api_client(), "test") as kube:
        with pytest.raises(Gone):
            async for _ in kube.watch(workloads_path(kubectl.namespace), "1", timeout_s=5):
                pass


async def test_the_controller_relists_after_gone(
    crd: KubeApiServer, kubectl: Kubectl, bus: Bus, operator_settings: OperatorSettings
) -> None:
    kubectl.apply(workload("web", storePath=store_path("web-1.0")))
    async with Kube(crd.api_client(), "test") as kube:
        lists: list[str] = []
        real_list = kube.list

        async def list_stale_first(
            path: str, *, label_selector: str | None = None, field_selector: str | None = None
        ) -> tuple[list[dict[str, Any]], str]:
            # The first list pretends to be old: nothing in it, a long-compacted version.
            lists.append(path)
            if len(lists) == 1:
                return [], "1"
            return await real_list(path, label_selector=label_selector)

        kube.list = list_stale_first  # type: ignore[method-assign]
        store = KubernetesStore(
            kube,
            namespace=kubectl.namespace,
            pdb_api_version="policy/v1beta1",
            resync_s=300,
            retry=Backoff(0.1, 1),
        )
        settings = operator_settings.model_copy(update={"preheat_nodes": ()})
        controller = Controller(store, bus, reconciler(settings, store, bus), settings)
        task = asyncio.create_task(controller._watch_workloads())
        try:
            await eventually(lambda: len(controller.queue) == 1, 30)
            assert await controller.queue.get() == (kubectl.namespace, "web")
            assert len(lists) == 2
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
