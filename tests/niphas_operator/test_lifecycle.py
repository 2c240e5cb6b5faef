"""A workload's life against a real kube-apiserver and a real nats-server: the first
reconcile asks the pipeline (push.received), build.done moves status and Deployment to the
new store path (preheated with path.wanted first), a failed build sets Degraded and keeps the
old Deployment, Deployment readiness reaches the status, `niphas rollback` restores the
previous path without any event on the bus, and deleting the workload removes its children."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from niphas_common.bus.bus import Bus
from niphas_common.tracing import tracer
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
    stream_totals,
    workload,
)

pytestmark = pytest.mark.slow


def _conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in obj.get("status", {}).get("conditions", [])}


def _deployment_path(kubectl: Kubectl, name: str) -> str | None:
    deployment = kubectl.get("deployment", name)
    if deployment is None:
        return None
    volume = deployment["spec"]["template"]["spec"]["volumes"][0]
    path: str = volume["csi"]["volumeAttributes"]["storePath"]
    return path


async def test_build_done_moves_the_workload_and_rollback_restores_it(
    kubectl: Kubectl,
    crd: KubeApiServer,
    bus: Bus,
    operator_settings: OperatorSettings,
    running_operator: OperatorRunner,
) -> None:
    """The whole life, in order: each step starts from where the one before left it."""
    kubectl.apply(workload("web", ref="refs/heads/main"))
    async with running_operator(operator_settings):
        await _asks_for_a_first_build(kubectl, bus)
        await _first_build_applied(kubectl, bus, operator_settings)
        await _becomes_ready(kubectl, crd)
        await _second_build_moves_on(kubectl, bus)
        await _failed_build_degrades(kubectl, bus)
        await _rollback_restores(kubectl, crd, bus)


async def _asks_for_a_first_build(kubectl: Kubectl, bus: Bus) -> None:
    # No store path yet: the operator asks the pipeline for an evaluation.
    async def requested() -> list[dict[str, Any]]:
        return await messages(bus, "push.received")

    pushes: list[dict[str, Any]] = []

    async def check_pushes() -> None:
        pushes[:] = await requested()

    await _eventually_async(check_pushes, lambda: len(pushes) == 1)
    push = pushes[0]
    assert push["forge"] == "niphas"
    assert push["repository"] == REPOSITORY
    assert push["ref"] == "refs/heads/main"
    assert push["commit"] is None
    assert push["delivery_id"] == f"{kubectl.namespace}/web/1"
    await eventually(
        lambda: (kubectl.get("nw", "web") or {}).get("status", {}).get("phase") == "Evaluating", 30
    )
    assert kubectl.get("deployment", "web") is None


async def _first_build_applied(
    kubectl: Kubectl, bus: Bus, operator_settings: OperatorSettings
) -> None:
    first = commit_of("one")
    # The builder reports the first build, inside a trace the mount must join.
    with tracer().start_as_current_span("build") as build_span:
        await bus.publish(build_done(first, "web-1.0"))
    build_trace = format(build_span.get_span_context().trace_id, "032x")
    await eventually(lambda: _deployment_path(kubectl, "web") == store_path("web-1.0"), 30)
    # The status follows the Deployment's apply.
    await eventually(
        lambda: (kubectl.get("nw", "web") or {}).get("status", {}).get("phase") == "Provisioning",
        30,
    )
    deployment = kubectl.get("deployment", "web")
    assert deployment is not None
    pod = deployment["spec"]["template"]["spec"]
    assert pod["containers"][0]["command"] == [f"{store_path('web-1.0')}/bin/web"]
    assert pod["containers"][0]["image"] == operator_settings.stub_image
    assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == "/nix/store"
    assert pod["volumes"][0]["csi"]["driver"] == "csi.niphas.io"
    carried = pod["volumes"][0]["csi"]["volumeAttributes"]["traceparent"]
    assert carried.split("-")[1] == build_trace
    assert pod["nodeSelector"] == {"niphas.io/store": "true"}
    owner = deployment["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == (
        "NiphasWorkload",
        "web",
        True,
    )
    wanted = await messages(bus, "path.wanted")
    assert [(w["node"], w["store_paths"]) for w in wanted] == [("node-a", [store_path("web-1.0")])]

    obj = kubectl.get("nw", "web")
    assert obj is not None
    status = obj["status"]
    assert status["storePath"] == store_path("web-1.0")
    assert status["commit"] == first
    assert status["closure"] == {"pathCount": 2, "narSize": 4096}
    assert [h["storePath"] for h in status["history"]] == [store_path("web-1.0")]
    conditions = _conditions(obj)
    assert conditions["Built"]["status"] == "True"
    assert conditions["ClosureAvailable"]["status"] == "True"
    assert conditions["Degraded"]["status"] == "False"
    assert conditions["Available"]["status"] == "False"  # no pods yet: no controllers here
    assert status["phase"] == "Provisioning"


async def _becomes_ready(kubectl: Kubectl, crd: KubeApiServer) -> None:
    # Readiness: write the Deployment's status as its controller would.
    mark_ready(crd, kubectl.namespace, "web", 1)
    await eventually(
        lambda: (kubectl.get("nw", "web") or {}).get("status", {}).get("phase") == "Running", 30
    )
    assert kubectl.get("nw", "web")["status"]["readyReplicas"] == 1  # type: ignore[index]


async def _second_build_moves_on(kubectl: Kubectl, bus: Bus) -> None:
    second = commit_of("two")
    # A second commit builds: status, history and Deployment move on.
    await bus.publish(build_done(second, "web-2.0"))
    await eventually(lambda: _deployment_path(kubectl, "web") == store_path("web-2.0"), 30)
    obj = kubectl.get("nw", "web")
    assert obj is not None
    assert [h["storePath"] for h in obj["status"]["history"]] == [
        store_path("web-2.0"),
        store_path("web-1.0"),
    ]
    assert [h["revision"] for h in obj["status"]["history"]] == [2, 1]
    assert obj["status"]["commit"] == second


async def _failed_build_degrades(kubectl: Kubectl, bus: Bus) -> None:
    # A failed build: Degraded with the reason, the Deployment keeps serving 2.0.
    await bus.publish(build_done(commit_of("three"), "web-3.0", failed=True))

    def degraded() -> bool:
        # The condition (the pipeline's), then the phase (the reconciler's, right after).
        obj = kubectl.get("nw", "web") or {}
        condition = _conditions(obj).get("Degraded", {}).get("status")
        return bool(condition == "True" and obj["status"].get("phase") == "Degraded")

    await eventually(degraded, 30)
    obj = kubectl.get("nw", "web")
    assert obj is not None
    assert _conditions(obj)["Degraded"]["reason"] == "BuildFailed"
    assert "exit code 1" in _conditions(obj)["Degraded"]["message"]
    assert obj["status"]["phase"] == "Degraded"
    assert obj["status"]["storePath"] == store_path("web-2.0")
    assert _deployment_path(kubectl, "web") == store_path("web-2.0")


async def _rollback_restores(kubectl: Kubectl, crd: KubeApiServer, bus: Bus) -> None:
    # Rollback to the first build: no evaluation, no build, no preheat; only the rollout's
    # own phase changes (workload.status) are announced.
    before = _pipeline(await stream_totals(bus))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "niphas_common",
            "rollback",
            "web",
            "--to",
            "1",
            "-n",
            kubectl.namespace,
            "--kubeconfig",
            str(crd.kubeconfig),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "pinned to revision 1" in out.stdout
    await eventually(lambda: _deployment_path(kubectl, "web") == store_path("web-1.0"), 30)
    deployment = kubectl.get("deployment", "web")
    assert deployment is not None
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == [f"{store_path('web-1.0')}/bin/web"]
    await eventually(
        lambda: (
            (kubectl.get("nw", "web") or {}).get("status", {}).get("storePath")
            == store_path("web-1.0")
        ),
        30,
    )
    assert _pipeline(await stream_totals(bus)) == before


def _pipeline(totals: dict[str, int]) -> dict[str, int]:
    """Messages per stream, but for the workloads' phase announcements."""
    return {stream: count for stream, count in totals.items() if stream != "WORKLOAD_STATUS"}


async def test_deleting_the_workload_removes_its_children(
    kubectl: Kubectl, operator_settings: OperatorSettings, running_operator: OperatorRunner
) -> None:
    kubectl.apply(
        workload(
            "api",
            storePath=store_path("api-1.0"),
            replicas=2,
            service={"ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
        )
    )
    async with running_operator(operator_settings):
        await eventually(
            lambda: all(
                kubectl.get(k, "api") is not None for k in ("deployment", "service", "pdb")
            ),
            30,
        )
        for kind in ("deployment", "service", "pdb"):
            child = kubectl.get(kind, "api")
            assert child is not None
            assert child["metadata"]["ownerReferences"][0]["name"] == "api"
        assert "niphas.io/cleanup" in kubectl.get("nw", "api")["metadata"]["finalizers"]  # type: ignore[index]
        # This apiserver runs no garbage collector: the finalizer alone removes the children.
        kubectl("delete", "nw", "api", "--wait=false")
        await eventually(
            lambda: all(
                kubectl.get(k, "api") is None for k in ("nw", "deployment", "service", "pdb")
            ),
            30,
        )


async def _eventually_async(refresh: Any, check: Any, timeout_s: float = 30.0) -> None:
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        await refresh()
        if check():
            return
        if loop.time() > deadline:
            raise AssertionError("condition not met")
        await asyncio.sleep(0.1)
