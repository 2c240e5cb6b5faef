"""A commit reaching a ref by a later push (real kube-apiserver, real nats-server): pushed to
`feature` and then fast-forwarded onto `main`, or `main` moved back to a commit it ran before.
The commit was evaluated and built for its first push; the later push gets its own eval.done
and build.done (`cached`), as the eval workers and the builder publish them, and a workload
following `main` moves to it."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from niphas_common.bus.bus import Bus
from niphas_operator.settings import OperatorSettings
from niphas_schemas import BuildDone, EvalDone
from tests.helpers import eventually
from tests.niphas_operator.conftest import (
    FLAKE_REF,
    Kubectl,
    OperatorRunner,
    build_done,
    commit_of,
    workload,
)
from tests.niphas_operator.test_following import FEATURE, MAIN, T0, _eval_done, _status, _took


def _push(
    commit: str, name: str, ref: str, pushed_at: datetime, *, first: bool
) -> tuple[EvalDone, BuildDone]:
    """The eval.done and build.done of one push of `commit` to `ref`: built for the first
    push of the commit, `cached` (and evaluated from the kept result) for any later one."""
    push_id = f"push-{ref.rsplit('/', 1)[1]}-{pushed_at.timestamp():.0f}"
    evaluated: EvalDone = _eval_done(commit, name, ref=ref, pushed_at=pushed_at).model_copy(
        update={"push_event_id": push_id, "event_id": f"eval-{push_id}"}
    )
    built: BuildDone = build_done(commit, name, ref=ref, pushed_at=pushed_at)
    built = built.model_copy(
        update={"eval_event_id": evaluated.event_id, "status": "built" if first else "cached"}
    )
    return evaluated, built


@pytest.mark.slow
async def test_main_moves_to_a_commit_fast_forwarded_from_feature_and_back(
    kubectl: Kubectl,
    bus: Bus,
    operator_settings: OperatorSettings,
    running_operator: OperatorRunner,
) -> None:
    old, merged = commit_of("main before the merge"), commit_of("the feature")
    kubectl.apply(workload("web", ref=MAIN))
    kubectl.apply(workload("web-feature", flakeRef=f"{FLAKE_REF}?ref=feature"))
    async with running_operator(operator_settings):
        for event in _push(old, "web-old", MAIN, T0, first=True):
            await bus.publish(event)
        await eventually(_took(kubectl, "web", old, "web-old"), 30)
        for event in _push(merged, "web-merged", FEATURE, T0 + timedelta(seconds=10), first=True):
            await bus.publish(event)
        await eventually(_took(kubectl, "web-feature", merged, "web-merged"), 30)
        assert _status(kubectl, "web")["storePath"].endswith("-web-old")

        # main fast-forwarded to the feature's commit.
        merge = T0 + timedelta(seconds=20)
        for event in _push(merged, "web-merged", MAIN, merge, first=False):
            await bus.publish(event)
        await eventually(_took(kubectl, "web", merged, "web-merged"), 30)
        status = _status(kubectl, "web")
        assert datetime.fromisoformat(status["pushedAt"]) == merge
        assert datetime.fromisoformat(status["evaluated"]["pushedAt"]) == merge

        # main moved back to the commit it ran before (a revert by push).
        back = T0 + timedelta(seconds=30)
        for event in _push(old, "web-old", MAIN, back, first=False):
            await bus.publish(event)
        await eventually(_took(kubectl, "web", old, "web-old"), 30)
        status = _status(kubectl, "web")
        assert datetime.fromisoformat(status["evaluated"]["pushedAt"]) == back
        assert {h["commit"] for h in status["history"]} >= {old, merged}
