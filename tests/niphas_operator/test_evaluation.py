"""eval.done reaching a workload (real apiserver, real nats-server): a successful evaluation
sets Evaluated and its mainProgram becomes the Deployment's command once the build lands; a
failed evaluation sets Degraded with the reason; an evaluation of another repository or
another revision touches nothing."""

from __future__ import annotations

from typing import Any

import pytest

from niphas_common.bus.bus import Bus
from niphas_operator.settings import OperatorSettings
from niphas_schemas import EvalDone, EvaluatedAttribute
from tests.helpers import eventually
from tests.niphas_operator.conftest import (
    REPOSITORY,
    Kubectl,
    OperatorRunner,
    build_done,
    commit_of,
    store_path,
    workload,
)

pytestmark = pytest.mark.slow


def _eval_done(commit: str, *, repository: str = REPOSITORY, error: str | None = None) -> EvalDone:
    attribute = EvaluatedAttribute(
        attribute="web",
        attr_path="packages.x86_64-linux.web",
        system="x86_64-linux",
        drv_path=None if error else store_path("web-1.0.drv"),
        outputs={} if error else {"out": store_path("web-1.0")},
        main_program=None if error else "web-server",
        error=error,
    )
    return EvalDone(
        push_event_id="push-1",
        repository=repository,
        commit=commit,
        status="succeeded",
        attributes=(attribute,),
    )


def _condition(kubectl: Kubectl, name: str, type_: str) -> dict[str, Any]:
    obj = kubectl.get("nw", name) or {}
    for condition in obj.get("status", {}).get("conditions", []):
        if condition["type"] == type_:
            return dict(condition)
    return {}


async def test_main_program_from_eval_done_becomes_the_command(
    kubectl: Kubectl,
    bus: Bus,
    operator_settings: OperatorSettings,
    running_operator: OperatorRunner,
) -> None:
    commit = commit_of("one")
    kubectl.apply(workload("web", revision=commit))
    kubectl.apply(workload("other", revision=commit_of("elsewhere")))
    async with running_operator(operator_settings):
        await bus.publish(_eval_done(commit))
        await bus.publish(_eval_done(commit, repository="https://forge.example/x.git"))
        await eventually(
            lambda: _condition(kubectl, "web", "Evaluated").get("status") == "True", 30
        )
        await bus.publish(build_done(commit, "web-1.0"))

        def command() -> list[str] | None:
            deployment = kubectl.get("deployment", "web")
            if deployment is None:
                return None
            value: list[str] = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
            return value

        await eventually(lambda: command() is not None, 30)
        assert command() == [f"{store_path('web-1.0')}/bin/web-server"]
        # Another revision: still waiting for its own evaluation.
        await eventually(
            lambda: _condition(kubectl, "other", "Evaluated").get("reason") == "Requested", 30
        )
        assert "evaluated" not in kubectl.get("nw", "other")["status"]  # type: ignore[index]
        assert kubectl.get("deployment", "other") is None


async def test_failed_evaluation_sets_degraded(
    kubectl: Kubectl,
    bus: Bus,
    operator_settings: OperatorSettings,
    running_operator: OperatorRunner,
) -> None:
    commit = commit_of("broken")
    kubectl.apply(workload("web", revision=commit))
    async with running_operator(operator_settings):
        await bus.publish(_eval_done(commit, error="attribute 'web' missing"))
        await eventually(lambda: _condition(kubectl, "web", "Degraded").get("status") == "True", 30)
        degraded = _condition(kubectl, "web", "Degraded")
        assert degraded["reason"] == "EvaluationFailed"
        assert "attribute 'web' missing" in degraded["message"]
        assert _condition(kubectl, "web", "Evaluated")["status"] == "False"
        assert kubectl.get("deployment", "web") is None
