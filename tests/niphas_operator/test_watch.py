"""Watching from a resourceVersion: the real apiserver answers a compacted version with 410
Gone, and the controller's list+watch loop relists on it, so nothing between the stale
version and now is missed."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from niphas_common.bus.bus import Bus
from niphas_operator.app import pod_settings
from niphas_operator.controller import Controller
from niphas_operator.kube import Gone, Kube, workloads_path
from niphas_operator.reconciler import Reconciler
from niphas_operator.settings import OperatorSettings
from tests.helpers import eventually
from tests.kube_harness import KubeApiServer
from tests.niphas_operator.conftest import Kubectl, store_path, workload

pytestmark = pytest.mark.slow


async def test_a_compacted_resource_version_is_gone(crd: KubeApiServer, kubectl: Kubectl) -> None:
    kubectl.apply(workload("web", storePath=store_path("web-1.0")))
    async with crd.api_client() as client:
        kube = Kube(client, "test")
        with pytest.raises(Gone):
            async for _ in kube.watch(workloads_path(kubectl.namespace), "1", timeout_s=5):
                pass


async def test_the_controller_relists_after_gone(
    crd: KubeApiServer, kubectl: Kubectl, bus: Bus, operator_settings: OperatorSettings
) -> None:
    kubectl.apply(workload("web", storePath=store_path("web-1.0")))
    async with crd.api_client() as client:
        kube = Kube(client, "test")
        lists: list[str] = []
        real_list = kube.list

        async def list_stale_first(
            path: str, *, label_selector: str | None = None
        ) -> tuple[list[dict[str, Any]], str]:
            # The first list pretends to be old: nothing in it, a long-compacted version.
            lists.append(path)
            if len(lists) == 1:
                return [], "1"
            return await real_list(path, label_selector=label_selector)

        kube.list = list_stale_first  # type: ignore[method-assign]
        reconciler = Reconciler(
            kube,
            bus.publish,
            pod_settings(operator_settings),
            pdb_api_version="policy/v1beta1",
            preheat_nodes=(),
            preheat_deadline_s=60,
        )
        controller = Controller(kube, bus, reconciler, operator_settings)
        task = asyncio.create_task(controller._watch_workloads())
        try:
            await eventually(lambda: len(controller.queue) == 1, 30)
            assert await controller.queue.get() == (kubectl.namespace, "web")
            assert len(lists) == 2
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
