"""Event models: validated store paths and hashes, frozen and closed models, deterministic
idempotency keys, and the consistency rules each subject states."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from niphas_schemas import (
    SUBJECTS,
    BuildDone,
    BuiltOutput,
    EvalDone,
    EvaluatedAttribute,
    PathAvailable,
    PathWanted,
    PushReceived,
    WorkloadRolled,
)

APP = "/nix/store/0c6d1awz8a5sd9gklwj6fckfh3fp7w9w-app"
DRV = "/nix/store/k1nbg8vck5bdm7wa7qx09x1gk24capd4-app.drv"
HASH = "sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "https://git.example.test/acme/app.git"


def test_every_subject_has_a_model() -> None:
    assert set(SUBJECTS) == {
        "push.received", "eval.done", "build.done", "path.wanted", "path.available",
        "workload.status",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("/nix/store/abc-x", "not a store path"),
        ("/nix/store/0c6d1awz8a5sd9gklwj6fckfh3fp7w9e-app", "not a store path"),  # 'e'
        ("/tmp/store/0c6d1awz8a5sd9gklwj6fckfh3fp7w9w-app", "not a store path"),
        ("/nix/store/0c6d1awz8a5sd9gklwj6fckfh3fp7w9w-a/b", "not a store path"),
        ("/nix/store/0c6d1awz8a5sd9gklwj6fckfh3fp7w9w-.hidden", "must not start with '.'"),
        ("/nix/store/0c6d1awz8a5sd9gklwj6fckfh3fp7w9w-" + "x" * 212, "longer than 211"),
    ],
)
def test_invalid_store_paths_are_rejected_with_a_reason(path: str, problem: str) -> None:
    with pytest.raises(ValidationError) as err:
        PathWanted(
            node="node-1",
            store_paths=(path,),
            deadline=datetime.now(UTC),
            requester="csi:vol-1",
        )
    assert problem in str(err.value)


def test_drv_path_needs_drv_suffix_and_hashes_their_form() -> None:
    output = BuiltOutput(name="out", path=APP, nar_hash=HASH, nar_size=1)
    with pytest.raises(ValidationError, match="not a derivation path"):
        BuildDone(
            eval_event_id="e1", repository=REPO, commit=COMMIT, attribute="default",
            drv_path=APP, status="built", outputs=(output,),
        )  # fmt: skip
    with pytest.raises(ValidationError, match="String should match pattern"):
        BuiltOutput(name="out", path=APP, nar_hash="sha256-abc", nar_size=1)


def test_models_are_frozen_and_closed() -> None:
    event = PushReceived(forge="github", repository=REPO, commit=COMMIT, delivery_id="d")
    with pytest.raises(ValidationError, match="frozen"):
        event.commit = "f" * 40  # type: ignore[misc]
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        PushReceived.model_validate({**event.model_dump(), "surprise": 1})
    with pytest.raises(ValidationError, match="timezone"):
        PushReceived(
            forge="github", repository=REPO, commit=COMMIT, delivery_id="d",
            occurred_at=datetime(2026, 1, 1),
        )  # fmt: skip


def test_json_round_trip() -> None:
    event = EvalDone(
        push_event_id="p1",
        repository=REPO,
        commit=COMMIT,
        status="succeeded",
        attributes=(
            EvaluatedAttribute(
                attribute="default", attr_path="packages.x86_64-linux.default",
                system="x86_64-linux", drv_path=DRV, outputs={"out": APP}, main_program="app",
            ),
        ),
    )  # fmt: skip
    assert EvalDone.model_validate_json(event.model_dump_json()) == event
    pushed = event.model_copy(update={"pushed_at": datetime(2030, 1, 1, 12, tzinfo=UTC)})
    assert EvalDone.model_validate_json(pushed.model_dump_json()) == pushed


def test_events_without_push_time_or_ref_still_validate() -> None:
    """`pushed_at` (eval.done, build.done) and `ref` (build.done) came later: optional."""
    evaluated = EvalDone.model_validate(
        {"push_event_id": "p1", "repository": REPO, "commit": COMMIT, "status": "failed",
         "error": "boom"}
    )  # fmt: skip
    assert (evaluated.ref, evaluated.pushed_at) == (None, None)
    built = BuildDone.model_validate(
        {"eval_event_id": "e1", "repository": REPO, "commit": COMMIT, "attribute": "app",
         "drv_path": DRV, "status": "failed", "log_tail": "error"}
    )  # fmt: skip
    assert (built.ref, built.pushed_at) == (None, None)
    with pytest.raises(ValidationError):
        BuildDone.model_validate({**built.model_dump(), "pushed_at": "2030-01-01T12:00:00"})


def test_idempotency_keys_follow_meaning_not_identity() -> None:
    a = PushReceived(forge="github", repository=REPO, commit=COMMIT, delivery_id="d-1")
    b = PushReceived(forge="github", repository=REPO, commit=COMMIT, delivery_id="d-1")
    c = PushReceived(forge="gitlab", repository=REPO, commit=COMMIT, delivery_id="d-1")
    assert a.event_id != b.event_id
    assert a.msg_id == b.msg_id == "push.received:github:d-1"
    assert c.msg_id != a.msg_id

    output = BuiltOutput(name="out", path=APP, nar_hash=HASH, nar_size=10)
    built = BuildDone(
        eval_event_id="e1", repository=REPO, commit=COMMIT, attribute="default",
        drv_path=DRV, status="built", outputs=(output,),
    )  # fmt: skip
    rebuilt = built.model_copy(update={"event_id": "other", "duration_s": 3.0})
    failed = BuildDone(
        eval_event_id="e1", repository=REPO, commit=COMMIT, attribute="default",
        drv_path=DRV, status="failed", log_tail="error: builder failed",
    )  # fmt: skip
    assert built.msg_id == rebuilt.msg_id
    assert failed.msg_id != built.msg_id


def test_each_push_of_one_commit_gets_its_own_eval_done_and_build_done() -> None:
    # One commit pushed to feature, then to main (a fast-forward): evaluated and built once,
    # but each push needs its own results, which the stream must not drop as duplicates.
    on_feature = EvalDone(
        push_event_id="push-feature", repository=REPO, ref="refs/heads/feature",
        commit=COMMIT, status="succeeded",
    )  # fmt: skip
    on_main = on_feature.model_copy(
        update={"event_id": "eval-main", "push_event_id": "push-main", "ref": "refs/heads/main"}
    )
    redelivered = on_main.model_copy(update={"event_id": "other", "occurred_at": _later()})
    assert on_main.msg_id != on_feature.msg_id
    assert redelivered.msg_id == on_main.msg_id

    output = BuiltOutput(name="out", path=APP, nar_hash=HASH, nar_size=10)
    built = BuildDone(
        eval_event_id=on_feature.event_id, repository=REPO, commit=COMMIT, attribute="default",
        drv_path=DRV, status="cached", outputs=(output,),
    )  # fmt: skip
    for_main = built.model_copy(update={"eval_event_id": on_main.event_id})
    again = for_main.model_copy(update={"event_id": "other", "occurred_at": _later()})
    assert for_main.msg_id != built.msg_id
    assert again.msg_id == for_main.msg_id


def _later() -> datetime:
    return datetime.now(UTC) + timedelta(minutes=5)


def test_consistency_rules() -> None:
    with pytest.raises(ValidationError, match="failed evaluation needs an error"):
        EvalDone(push_event_id="p", repository=REPO, commit=COMMIT, status="failed")
    with pytest.raises(ValidationError, match="failed build needs a log_tail"):
        BuildDone(
            eval_event_id="e", repository=REPO, commit=COMMIT, attribute="a",
            drv_path=DRV, status="failed",
        )  # fmt: skip
    with pytest.raises(ValidationError, match="needs nar_hash and nar_size"):
        PathAvailable(
            holder_kind="node", holder="node-1", holder_url="http://10.0.0.1:8080",
            store_path=APP,
        )  # fmt: skip
    withdrawn = PathAvailable(
        holder_kind="node", holder="node-1", holder_url="http://10.0.0.1:8080",
        store_path=APP, state="withdrawn",
    )  # fmt: skip
    later = withdrawn.model_copy(update={"occurred_at": withdrawn.occurred_at + timedelta(1)})
    assert later.msg_id != withdrawn.msg_id  # a state announcement may recur
    with pytest.raises(ValidationError, match="an attribute without error needs"):
        EvaluatedAttribute(attribute="a", attr_path="packages.x.a", system="x86_64-linux")


def test_a_workload_rollout_names_the_workload_commit_and_a_known_phase() -> None:
    rolled = WorkloadRolled(
        namespace="team-a",
        name="web",
        repository=REPO,
        commit=COMMIT,
        store_path=APP,
        phase="Running",
        reason="MinimumReplicasAvailable",
        message="1 available",
    )
    assert WorkloadRolled.model_validate_json(rolled.model_dump_json()) == rolled
    again = rolled.model_copy(update={"event_id": "other"})
    assert again.msg_id == rolled.msg_id  # the same announcement published twice
    later = rolled.model_copy(update={"occurred_at": rolled.occurred_at + timedelta(seconds=1)})
    assert later.msg_id != rolled.msg_id  # back in the same phase later: a new event
    fields = rolled.model_dump()
    for wrong in (
        {"phase": "Evaluating"},
        {"namespace": "Team_A"},
        {"reason": ""},
        {"unknown": 1},
    ):
        with pytest.raises(ValidationError):
            WorkloadRolled.model_validate({**fields, **wrong})
