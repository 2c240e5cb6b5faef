"""`workload.status`: the operator publishes each change of a workload's phase for the commit
it runs (Provisioning, Running, Degraded), on a real kube-apiserver and nats-server, and in
render mode through the same reconciler; nothing before a commit runs (Evaluating, Building)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml

from niphas_common.bus.bus import Bus
from niphas_common.settings import NatsSettings
from niphas_operator.app import run
from niphas_operator.settings import OperatorSettings
from tests.helpers import eventually
from tests.kube_harness import KubeApiServer
from tests.niphas_operator.conftest import (
    REPOSITORY,
    Kubectl,
    OperatorRunner,
    build_done,
    commit_of,
    mark_ready,
    messages,
    store_path,
    workload,
)

pytestmark = pytest.mark.slow


async def _rollouts(bus: Bus, namespace: str, name: str) -> list[dict[str, Any]]:
    """The workload's `workload.status` events in order, each fact once (a reconcile retried
    after a conflicting write may announce the same phase again)."""
    found: list[dict[str, Any]] = []
    for body in await messages(bus, "workload.status"):
        if (body["namespace"], body["name"]) != (namespace, name):
            continue
        if found and (found[-1]["commit"], found[-1]["phase"]) == (body["commit"], body["phase"]):
            continue
        found.append(body)
    return found


async def _phases(bus: Bus, namespace: str, name: str) -> list[tuple[str, str]]:
    return [(b["commit"], b["phase"]) for b in await _rollouts(bus, namespace, name)]


async def _until(bus: Bus, namespace: str, name: str, count: int) -> list[tuple[str, str]]:
    async def enough() -> bool:
        return len(await _phases(bus, namespace, name)) >= count

    for _ in range(300):
        if await enough():
            break
        await asyncio.sleep(0.1)
    return await _phases(bus, namespace, name)


async def test_each_phase_change_of_a_running_commit_is_published(
    kubectl: Kubectl,
    crd: KubeApiServer,
    bus: Bus,
    operator_settings: OperatorSettings,
    running_operator: OperatorRunner,
) -> None:
    ns = kubectl.namespace
    one, two, three = commit_of("r-one"), commit_of("r-two"), commit_of("r-three")
    kubectl.apply(workload("web"))
    async with running_operator(operator_settings):
        await eventually(lambda: (kubectl.get("nw", "web") or {}).get("status", {}).get("phase"))
        assert await _phases(bus, ns, "web") == []  # evaluating: no commit runs yet

        await bus.publish(build_done(one, "web-1.0"))
        assert await _until(bus, ns, "web", 1) == [(one, "Provisioning")]
        mark_ready(crd, ns, "web", 1)
        assert await _until(bus, ns, "web", 2) == [(one, "Provisioning"), (one, "Running")]

        await bus.publish(build_done(two, "web-2.0"))
        assert (await _until(bus, ns, "web", 3))[2:] == [(two, "Provisioning")]
        mark_ready(crd, ns, "web", 1)
        assert (await _until(bus, ns, "web", 4))[3:] == [(two, "Running")]

        # A newer build failed: the running commit's workload is Degraded, saying why.
        await bus.publish(build_done(three, "web-3.0", failed=True))
        assert (await _until(bus, ns, "web", 5))[4:] == [(two, "Degraded")]

    last = (await _rollouts(bus, ns, "web"))[-1]
    assert last["reason"] == "BuildFailed"
    assert last["repository"] == REPOSITORY
    assert last["store_path"] == store_path("web-2.0")
    running = (await _rollouts(bus, ns, "web"))[1]
    assert running["reason"] == "MinimumReplicasAvailable" and running["message"]


async def test_render_mode_publishes_the_rollout_through_the_same_reconciler(
    bus: Bus, nats_settings: NatsSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    workloads = tmp_path / "workloads"
    workloads.mkdir()
    manifest = workload("site")
    manifest["metadata"]["namespace"] = "rendered"
    (workloads / "site.yaml").write_text(yaml.safe_dump(manifest))
    settings = OperatorSettings(
        workloads_dir=workloads, render_dir=tmp_path / "out", state_dir=tmp_path / "state"
    )
    commit = commit_of("render-rollout")
    stop = asyncio.Event()
    task = asyncio.create_task(run(settings, nats_settings, stop))
    try:
        deployment = tmp_path / "out" / "rendered" / "site" / "deployment.yaml"

        async def published_then_rendered() -> None:
            # The operator's first evaluation request says it consumes; then the build.
            while not [
                m
                for m in await messages(bus, "push.received")
                if m["delivery_id"].startswith("rendered/site/")
            ]:
                await asyncio.sleep(0.1)
            await bus.publish(build_done(commit, "site-1.0"))

        await asyncio.wait_for(published_then_rendered(), 30)
        await eventually(deployment.exists, 30)
        # Nothing reports readiness in render mode: the rollout stays pending.
        assert await _until(bus, "rendered", "site", 1) == [(commit, "Provisioning")]
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
