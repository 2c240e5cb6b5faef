"""Multi-architecture workloads on a real kube-apiserver: one Deployment per architecture,
each with the store path built for its system and a node selector for its architecture,
status per architecture; a build handled before the evaluation that says which system it is
for is retried until it is; an architecture no node has is a condition and the phase's reason
(not pods Pending without a word); dropping an architecture removes its Deployment."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from niphas_common.bus.bus import Bus
from niphas_operator.settings import OperatorSettings
from tests.helpers import eventually
from tests.kube_harness import KubeApiServer
from tests.niphas_operator.conftest import (
    Kubectl,
    OperatorRunner,
    build_done,
    commit_of,
    eval_done,
    mark_ready,
    store_path,
    workload,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def amd64_node(crd: KubeApiServer) -> Iterator[str]:
    """A Node object of architecture amd64 that runs closures (no kubelet behind it)."""
    name = f"amd64-{uuid.uuid4().hex[:8]}"
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/arch": "amd64", "niphas.io/store": "true"},
        },
    }
    crd.kubectl("create", "-f", "-", input=yaml.safe_dump(node))
    yield name
    crd.kubectl("delete", "node", name, "--wait=false")


def _conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in obj.get("status", {}).get("conditions", [])}


def _pod(kubectl: Kubectl, name: str) -> dict[str, Any] | None:
    deployment = kubectl.get("deployment", name)
    return None if deployment is None else deployment["spec"]["template"]["spec"]


async def test_one_deployment_per_architecture(
    kubectl: Kubectl,
    crd: KubeApiServer,
    bus: Bus,
    amd64_node: str,
    operator_settings: OperatorSettings,
    running_operator: OperatorRunner,
) -> None:
    commit = commit_of("multi")
    kubectl.apply(workload("multi", ref="refs/heads/main", architectures=["amd64", "arm64"]))
    async with running_operator(operator_settings):
        # The arm64 build may be handled before the evaluation naming its output (then it
        # is retried until that evaluation is there).
        await bus.publish(build_done(commit, "multi-arm"))
        evaluation = {"x86_64-linux": "multi-x86", "aarch64-linux": "multi-arm"}
        await bus.publish(eval_done(commit, evaluation, main_program="srv"))
        await bus.publish(build_done(commit, "multi-x86"))
        await eventually(lambda: _pod(kubectl, "multi-arm64") is not None, 30)
        await eventually(lambda: _pod(kubectl, "multi-amd64") is not None, 30)

        amd64, arm64 = _pod(kubectl, "multi-amd64"), _pod(kubectl, "multi-arm64")
        assert amd64 is not None and arm64 is not None
        assert amd64["nodeSelector"] == {"kubernetes.io/arch": "amd64", "niphas.io/store": "true"}
        assert arm64["nodeSelector"]["kubernetes.io/arch"] == "arm64"
        assert amd64["containers"][0]["command"] == [f"{store_path('multi-x86')}/bin/srv"]
        assert arm64["containers"][0]["command"] == [f"{store_path('multi-arm')}/bin/srv"]
        arm_volume = arm64["volumes"][0]["csi"]["volumeAttributes"]
        assert arm_volume["storePath"] == store_path("multi-arm")
        assert kubectl.get("deployment", "multi") is None

        def said_no_node() -> bool:
            # The status write follows the Deployments' apply: until then a reconcile from
            # before the amd64 build may still say Building.
            obj = kubectl.get("nw", "multi") or {}
            schedulable = _conditions(obj).get("Schedulable", {}).get("status") == "False"
            return schedulable and obj["status"].get("phase") != "Building"

        await eventually(said_no_node, 30)
        obj = kubectl.get("nw", "multi")
        assert obj is not None
        schedulable = _conditions(obj)["Schedulable"]
        assert schedulable["reason"] == "NoNodeForArchitecture"
        assert "kubernetes.io/arch=arm64" in schedulable["message"]
        assert "amd64" not in schedulable["message"]
        assert obj["status"]["phase"] == "Degraded"
        assert obj["status"]["reason"] == "NoNodeForArchitecture"
        entries = {a["architecture"]: a for a in obj["status"]["architectures"]}
        assert entries["amd64"]["system"] == "x86_64-linux"
        assert entries["amd64"]["storePath"] == store_path("multi-x86")
        assert entries["arm64"]["storePath"] == store_path("multi-arm")
        assert entries["arm64"]["commit"] == commit
        # The first architecture is what status.storePath (and rollback) speak of.
        assert obj["status"]["storePath"] == store_path("multi-x86")

        # Only amd64 now: the arm64 Deployment goes, the amd64 one becomes ready: Running.
        kubectl(
            "patch", "nw", "multi", "--type=merge", "-p", '{"spec":{"architectures":["amd64"]}}'
        )
        await eventually(lambda: kubectl.get("deployment", "multi-arm64") is None, 30)
        mark_ready(crd, kubectl.namespace, "multi-amd64", 1)

        def running() -> bool:
            phase = (kubectl.get("nw", "multi") or {}).get("status", {}).get("phase")
            return bool(phase == "Running")

        await eventually(running, 30)
        obj = kubectl.get("nw", "multi")
        assert obj is not None
        assert _conditions(obj)["Schedulable"]["status"] == "True"
        assert [a["architecture"] for a in obj["status"]["architectures"]] == ["amd64"]
        assert obj["status"]["architectures"][0]["readyReplicas"] == 1
