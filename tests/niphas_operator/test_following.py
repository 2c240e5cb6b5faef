"""Which results of the pipeline a workload follows (real kube-apiserver, real nats-server):
only those of pushes to its own ref (a workload naming no ref follows the default branch),
and only the newest push: an evaluation or build of an earlier push that finishes late is
ignored, with a `Superseded` Event saying why. The matching rules themselves are unit-tested
at the end."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from niphas_common.bus.bus import Bus
from niphas_common.flakeref import same_branch
from niphas_operator.pipeline import matches
from niphas_operator.settings import OperatorSettings
from niphas_operator.workload import Workload
from niphas_schemas import EvalDone, EvaluatedAttribute
from tests.helpers import eventually
from tests.niphas_operator.conftest import (
    FLAKE_REF,
    REPOSITORY,
    Kubectl,
    OperatorRunner,
    build_done,
    commit_of,
    store_path,
    workload,
)

MAIN, FEATURE = "refs/heads/main", "refs/heads/feature"
T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
EARLIER, LATER = T0, T0 + timedelta(seconds=30)


def _eval_done(
    commit: str, name: str, *, ref: str | None = None, pushed_at: datetime | None = None
) -> EvalDone:
    return EvalDone(
        push_event_id=f"push-{commit[:8]}",
        repository=REPOSITORY,
        ref=ref,
        commit=commit,
        pushed_at=pushed_at,
        status="succeeded",
        attributes=(
            EvaluatedAttribute(
                attribute="web",
                attr_path="packages.x86_64-linux.web",
                system="x86_64-linux",
                drv_path=store_path(f"{name}.drv"),
                outputs={"out": store_path(name)},
                main_program=name,
            ),
        ),
    )


def _status(kubectl: Kubectl, name: str) -> dict[str, Any]:
    status: dict[str, Any] = (kubectl.get("nw", name) or {}).get("status", {})
    return status


def _took(kubectl: Kubectl, name: str, commit: str, built: str) -> Callable[[], bool]:
    """Whether workload `name` evaluated `commit` and runs `built`."""

    def check() -> bool:
        status = _status(kubectl, name)
        return (
            status.get("storePath") == store_path(built)
            and status.get("evaluated", {}).get("commit") == commit
        )

    return check


def _events(kubectl: Kubectl, name: str, reason: str) -> list[dict[str, Any]]:
    listed = json.loads(
        kubectl("get", "events", "--field-selector", f"involvedObject.name={name}", "-o", "json")
    )
    return [e for e in listed["items"] if e["reason"] == reason]


@pytest.mark.slow
async def test_a_workload_follows_only_pushes_to_its_own_ref(
    kubectl: Kubectl,
    bus: Bus,
    operator_settings: OperatorSettings,
    running_operator: OperatorRunner,
) -> None:
    on_main, on_feature = commit_of("main"), commit_of("feature")
    kubectl.apply(workload("web", ref=MAIN))
    kubectl.apply(workload("web-default"))  # names no ref: the default branch
    # Follows feature. Listed after the others, so once a handler reached it, it is done
    # with them too.
    kubectl.apply(workload("web-feature", flakeRef=f"{FLAKE_REF}?ref=feature"))
    async with running_operator(operator_settings):
        await bus.publish(_eval_done(on_feature, "web-feature-1", ref=FEATURE))
        await bus.publish(build_done(on_feature, "web-feature-1", ref=FEATURE))
        await eventually(_took(kubectl, "web-feature", on_feature, "web-feature-1"), 30)
        for name in ("web", "web-default"):
            assert "storePath" not in _status(kubectl, name)
            assert "evaluated" not in _status(kubectl, name)

        await bus.publish(_eval_done(on_main, "web-1", ref=MAIN))
        await bus.publish(build_done(on_main, "web-1", ref=MAIN))
        for name in ("web", "web-default"):
            await eventually(_took(kubectl, name, on_main, "web-1"), 30)
            assert [h["commit"] for h in _status(kubectl, name)["history"]] == [on_main]
        assert _status(kubectl, "web-feature")["storePath"] == store_path("web-feature-1")


@pytest.mark.slow
async def test_a_late_build_of_an_earlier_push_is_ignored(
    kubectl: Kubectl,
    bus: Bus,
    operator_settings: OperatorSettings,
    running_operator: OperatorRunner,
) -> None:
    first, second = commit_of("pushed first"), commit_of("pushed second")
    kubectl.apply(workload("web", ref=MAIN))
    async with running_operator(operator_settings):
        # The second push's build finishes first...
        await bus.publish(build_done(second, "web-2", ref=MAIN, pushed_at=LATER))
        await eventually(lambda: _status(kubectl, "web").get("storePath") == store_path("web-2"))
        # ...then the first push's.
        await bus.publish(build_done(first, "web-1", ref=MAIN, pushed_at=EARLIER))
        await eventually(lambda: bool(_events(kubectl, "web", "Superseded")), 30)

        (event,) = _events(kubectl, "web", "Superseded")
        assert f"build of web at {first[:12]}" in event["message"]
        assert f"it runs {second[:12]}" in event["message"]
        assert event["involvedObject"]["kind"] == "NiphasWorkload"
        status = _status(kubectl, "web")
        assert status["storePath"] == store_path("web-2")
        assert status["commit"] == second
        assert [h["commit"] for h in status["history"]] == [second]
        assert datetime.fromisoformat(status["pushedAt"]) == LATER
        await eventually(lambda: kubectl.get("deployment", "web") is not None, 30)
        deployment = kubectl.get("deployment", "web") or {}
        volume = deployment["spec"]["template"]["spec"]["volumes"][0]
        assert volume["csi"]["volumeAttributes"]["storePath"] == store_path("web-2")

        # A later push still moves it.
        third = commit_of("pushed third")
        await bus.publish(
            build_done(third, "web-3", ref=MAIN, pushed_at=LATER + timedelta(seconds=1))
        )
        await eventually(lambda: _status(kubectl, "web").get("storePath") == store_path("web-3"))


@pytest.mark.slow
async def test_a_late_evaluation_of_an_earlier_push_is_ignored(
    kubectl: Kubectl,
    bus: Bus,
    operator_settings: OperatorSettings,
    running_operator: OperatorRunner,
) -> None:
    first, second = commit_of("evaluated first"), commit_of("evaluated second")
    kubectl.apply(workload("web"))
    async with running_operator(operator_settings):
        await bus.publish(_eval_done(second, "web-2", ref=MAIN, pushed_at=LATER))
        await eventually(
            lambda: _status(kubectl, "web").get("evaluated", {}).get("commit") == second, 30
        )
        await bus.publish(_eval_done(first, "web-1", ref=MAIN, pushed_at=EARLIER))
        await eventually(lambda: bool(_events(kubectl, "web", "Superseded")), 30)

        (event,) = _events(kubectl, "web", "Superseded")
        assert f"evaluation at {first[:12]}" in event["message"]
        evaluated = _status(kubectl, "web")["evaluated"]
        assert evaluated["commit"] == second
        assert evaluated["outPath"] == store_path("web-2")
        assert evaluated["mainProgram"] == "web-2"
        assert datetime.fromisoformat(evaluated["pushedAt"]) == LATER


def _workload(**spec: Any) -> Workload:
    return Workload(
        {
            "metadata": {"namespace": "apps", "name": "web", "uid": "u"},
            "spec": {"flakeRef": FLAKE_REF, "attribute": "web", **spec},
        }
    )


def test_a_workload_naming_no_ref_follows_main_or_master() -> None:
    assert same_branch(None, None)
    assert same_branch(None, MAIN)
    assert same_branch(None, "refs/heads/master")
    assert not same_branch(None, FEATURE)
    assert not same_branch(None, "refs/tags/v1")
    # A push naming no ref is a push to the default branch.
    assert same_branch(MAIN, None)
    assert not same_branch(FEATURE, None)
    assert same_branch(FEATURE, FEATURE)
    assert not same_branch(MAIN, "refs/heads/master")


def test_matching_by_ref_and_revision() -> None:
    commit = commit_of("c")
    assert matches(_workload(ref=FEATURE), REPOSITORY, commit, "web", FEATURE)
    assert not matches(_workload(ref=FEATURE), REPOSITORY, commit, "web", MAIN)
    assert matches(
        _workload(flakeRef=f"{FLAKE_REF}?ref=feature"), REPOSITORY, commit, None, FEATURE
    )
    assert not matches(_workload(), REPOSITORY, commit, "web", FEATURE)
    # A pinned revision names its commit, whichever ref it was pushed to.
    assert matches(_workload(revision=commit, ref=MAIN), REPOSITORY, commit, "web", FEATURE)
    assert not matches(_workload(revision=commit), REPOSITORY, commit_of("d"), "web", None)
