"""Restarting the operator: a build.done published while it was down is applied when it comes
back (its durable consumer kept the event), and a restart with nothing new writes nothing:
server-side apply of unchanged children and an unchanged status leave every
resourceVersion as it was."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from niphas_common.bus.bus import Bus
from niphas_operator.settings import OperatorSettings
from tests.helpers import eventually
from tests.niphas_operator.conftest import (
    Kubectl,
    OperatorRunner,
    build_done,
    commit_of,
    store_path,
    workload,
)

pytestmark = pytest.mark.slow


def _applied() -> float:
    value = REGISTRY.get_sample_value("niphas_operator_reconciles_total", {"outcome": "applied"})
    return value or 0.0


def _versions(kubectl: Kubectl) -> dict[str, str]:
    out = {}
    for kind in ("nw", "deployment", "service"):
        obj = kubectl.get(kind, "web")
        assert obj is not None
        out[kind] = obj["metadata"]["resourceVersion"]
    return out


def _settled(kubectl: Kubectl, name: str) -> bool:
    """The operator's status caught up with the Deployment it applied."""
    obj = kubectl.get("nw", "web") or {}
    status = obj.get("status", {})
    observed = bool(status.get("observedGeneration") == obj["metadata"]["generation"])
    return observed and status.get("resolvedCommand") == [f"{store_path(name)}/bin/web"]


def _deployment_path(kubectl: Kubectl) -> str | None:
    deployment = kubectl.get("deployment", "web")
    if deployment is None:
        return None
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    value: str = annotations["niphas.io/store-path"]
    return value


async def test_restart_loses_nothing_and_applies_nothing_twice(
    kubectl: Kubectl,
    bus: Bus,
    operator_settings: OperatorSettings,
    running_operator: OperatorRunner,
) -> None:
    kubectl.apply(workload("web", service={"ports": [{"port": 80}]}))
    async with running_operator(operator_settings):
        await bus.publish(build_done(commit_of("one"), "web-1.0"))
        await eventually(lambda: _deployment_path(kubectl) == store_path("web-1.0"), 30)
        await eventually(lambda: kubectl.get("service", "web") is not None, 30)

    # Down: the builder finishes another build meanwhile.
    await bus.publish(build_done(commit_of("two"), "web-2.0"))
    async with running_operator(operator_settings):
        await eventually(lambda: _deployment_path(kubectl) == store_path("web-2.0"), 30)
        await eventually(
            lambda: (
                (kubectl.get("nw", "web") or {}).get("status", {}).get("storePath")
                == store_path("web-2.0")
            ),
            30,
        )
        await eventually(lambda: _settled(kubectl, "web-2.0"), 30)
    settled = _versions(kubectl)

    # Up again with nothing new: it reconciles everything and changes nothing.
    before = _applied()
    async with running_operator(operator_settings):
        await eventually(lambda: _applied() > before, 30)
    assert _versions(kubectl) == settled
    history = kubectl.get("nw", "web")["status"]["history"]  # type: ignore[index]
    assert [h["storePath"] for h in history] == [store_path("web-2.0"), store_path("web-1.0")]
