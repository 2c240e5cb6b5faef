"""A workload's lifecycle as a user sees it (real kube-apiserver, real nats-server): the
phases Evaluating, Building, Provisioning, Running, Degraded and Failed with their reason in
`kubectl get nw`, `status.lastEval` and `status.closurePaths`, and an Event for every step
(evaluated, built, provisioned, available, degraded, rolled back) naming the commit and the
store path, as `kubectl describe nw` shows them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import pytest

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
    events_of,
    mark_ready,
    store_path,
    workload,
)

pytestmark = pytest.mark.slow


def _printed(kubectl: Kubectl, name: str) -> dict[str, str]:
    """`kubectl get nw NAME` as a user reads it: column -> value (by the header's offsets,
    since an empty column prints as blanks)."""
    header, _, row = kubectl("get", "nw", name).partition("\n")
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    ends = [*starts[1:], None]
    return {header[a:b].strip(): row[a:b].strip() for a, b in zip(starts, ends, strict=True)}


async def _phase(kubectl: Kubectl, name: str, phase: str) -> dict[str, Any]:
    def reached() -> bool:
        now = (kubectl.get("nw", name) or {}).get("status", {}).get("phase")
        return bool(now == phase)

    try:
        await eventually(reached, 30)
    except AssertionError:
        raise AssertionError(json.dumps(kubectl.get("nw", name), indent=1)) from None
    obj = kubectl.get("nw", name)
    assert obj is not None
    return obj


def _reasons(kubectl: Kubectl, name: str) -> dict[str, str]:
    """Event reason -> the messages of its Events, one per line."""
    found: dict[str, str] = {}
    for event in events_of(kubectl, name):
        found[event["reason"]] = f"{found.get(event['reason'], '')}{event['message']}\n"
    return found


async def test_phases_reasons_and_an_event_for_every_step(
    kubectl: Kubectl,
    crd: KubeApiServer,
    bus: Bus,
    operator_settings: OperatorSettings,
    running_operator: OperatorRunner,
) -> None:
    one, two, three = commit_of("p-one"), commit_of("p-two"), commit_of("p-three")
    kubectl.apply(workload("web", ref="refs/heads/main"))
    # Another attribute of the same flake, which the evaluation does not have.
    kubectl.apply(workload("api", ref="refs/heads/main", attribute="api"))
    async with running_operator(operator_settings):
        await _phase(kubectl, "web", "Evaluating")
        assert _printed(kubectl, "web")["PHASE"] == "Evaluating"
        assert _printed(kubectl, "web")["REASON"] == "EvaluationRequested"

        await bus.publish(eval_done(one, {"x86_64-linux": "web-1.0"}, main_program="web"))
        obj = await _phase(kubectl, "web", "Building")
        assert obj["status"]["reason"] == "Evaluated"
        assert obj["status"]["lastEval"]["commit"] == one
        assert obj["status"]["lastEval"]["succeeded"] is True
        # Nothing runs and the evaluation cannot give it anything: Failed, with the reason.
        api = await _phase(kubectl, "api", "Failed")
        assert api["status"]["reason"] == "EvaluationFailed"
        assert "no attribute 'api'" in api["status"]["message"]
        assert api["status"]["lastEval"]["succeeded"] is False
        assert _printed(kubectl, "api")["REASON"] == "EvaluationFailed"

        await bus.publish(build_done(one, "web-1.0"))
        obj = await _phase(kubectl, "web", "Provisioning")
        assert obj["status"]["closurePaths"] == sorted(
            [store_path("web-1.0"), store_path("web-1.0-lib")]
        )
        mark_ready(crd, kubectl.namespace, "web", 1)
        obj = await _phase(kubectl, "web", "Running")
        assert obj["status"]["reason"] == "MinimumReplicasAvailable"

        await bus.publish(build_done(two, "web-2.0"))
        await _phase(kubectl, "web", "Provisioning")
        mark_ready(crd, kubectl.namespace, "web", 1)
        await _phase(kubectl, "web", "Running")

        await bus.publish(build_done(three, "web-3.0", failed=True))
        obj = await _phase(kubectl, "web", "Degraded")
        assert obj["status"]["reason"] == "BuildFailed"
        assert _printed(kubectl, "web")["REASON"] == "BuildFailed"

        _rollback(crd, kubectl.namespace, "web", 1)
        await eventually(lambda: "RolledBack" in _reasons(kubectl, "web"), 30)

    events = _reasons(kubectl, "web")
    assert one[:12] in events["Evaluated"] and store_path("web-1.0") in events["Evaluated"]
    assert two[:12] in events["Built"] and store_path("web-2.0") in events["Built"]
    assert two[:12] in events["Provisioned"] and store_path("web-2.0") in events["Provisioned"]
    assert store_path("web-2.0") in events["Available"] and two[:12] in events["Available"]
    assert three[:12] in events["BuildFailed"]
    assert "BuildFailed" in events["Degraded"] and store_path("web-2.0") in events["Degraded"]
    assert "revision 1" in events["RolledBack"] and store_path("web-1.0") in events["RolledBack"]
    assert one[:12] in events["RolledBack"]
    warnings = {e["reason"] for e in events_of(kubectl, "web") if e["type"] == "Warning"}
    assert warnings == {"BuildFailed", "Degraded"}
    # Two builds moved it: two Provisioned Events, one per store path.
    provisioned = [e for e in events_of(kubectl, "web") if e["reason"] == "Provisioned"]
    assert len(provisioned) == 2

    described = kubectl("describe", "nw", "web")
    for reason in ("Evaluated", "Built", "Provisioned", "Available", "Degraded", "RolledBack"):
        assert reason in described, reason
    assert store_path("web-1.0") in described


def _rollback(server: KubeApiServer, namespace: str, name: str, to: int) -> None:
    subprocess.run(
        [sys.executable, "-m", "niphas_common", "rollback", name, "--to", str(to),
         "-n", namespace, "--kubeconfig", str(server.kubeconfig)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip


async def test_a_dotted_attribute_takes_only_its_own_systems_results(
    kubectl: Kubectl,
    bus: Bus,
    operator_settings: OperatorSettings,
    running_operator: OperatorRunner,
) -> None:
    """`packages.x86_64-linux.web` is matched by its path; a workload naming another system
    is not moved, nor failed, by an evaluation that did not cover that system."""
    commit = commit_of("dotted")
    kubectl.apply(workload("x86", ref="refs/heads/main", attribute="packages.x86_64-linux.web"))
    kubectl.apply(workload("arm", ref="refs/heads/main", attribute="packages.aarch64-linux.web"))
    async with running_operator(operator_settings):
        await _phase(kubectl, "x86", "Evaluating")
        await _phase(kubectl, "arm", "Evaluating")
        await bus.publish(eval_done(commit, {"x86_64-linux": "web-x86"}, main_program="srv"))
        await bus.publish(build_done(commit, "web-x86"))

        def runs() -> bool:
            deployment = kubectl.get("deployment", "x86")
            return deployment is not None and deployment["spec"]["template"]["spec"]["containers"][
                0
            ]["command"] == [f"{store_path('web-x86')}/bin/srv"]

        await eventually(runs, 30)
        # The same name built for x86_64-linux is not the aarch64-linux workload's.
        arm = kubectl.get("nw", "arm")
        assert arm is not None
        assert arm["status"]["phase"] == "Evaluating"
        assert "storePath" not in arm["status"]
        assert kubectl.get("deployment", "arm") is None
