"""Pushes of a commit that was already evaluated (real nats-server, real nix): a commit pushed
to `feature` and then fast-forwarded onto `main`, or a ref moved back to a commit it had
before, is evaluated once, and every push still gets its own `eval.done` (its push event, ref
and push time, with a distinct Msg-Id) from the kept result; a failed result stays failed; a
redelivered push publishes nothing more; and a push arriving while another worker evaluates
the same commit waits for that result instead of going unanswered."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from prometheus_client import REGISTRY

from niphas_common.bus.bus import Bus
from niphas_common.bus.consumer import Delivery
from niphas_eval.app import build_worker
from niphas_eval.evaluator import Evaluation
from niphas_eval.settings import EvalSettings
from niphas_eval.worker import EvalWorker
from niphas_schemas import EvalDone, PushReceived
from tests.helpers import eventually, serving
from tests.niphas_eval.conftest import GitRepo, eval_dones, push_for
from tests.niphas_eval.test_worker import settled, wait_for_dones

pytestmark = pytest.mark.nix

MAIN, FEATURE = "refs/heads/main", "refs/heads/feature"


async def redeliver(bus: Bus, push: PushReceived) -> None:
    """The same push.received once more, past the stream's de-duplication (as JetStream
    redelivers an event whose ack was lost)."""
    await bus.js.publish(push.subject, push.model_dump_json().encode())


async def all_handled(bus: Bus, deliveries: int) -> None:
    """Wait until the workers took and acked `deliveries` push.received messages."""
    info = await bus.js.consumer_info("PUSH_RECEIVED", "eval-workers")
    for _ in range(600):
        done = info.num_ack_pending == 0 and info.num_pending == 0
        if done and info.delivered.consumer_seq >= deliveries:
            return
        await asyncio.sleep(0.05)
        info = await bus.js.consumer_info("PUSH_RECEIVED", "eval-workers")
    raise AssertionError(f"pushes not all handled: {info}")


def _by_push(dones: list[EvalDone]) -> dict[str, EvalDone]:
    by_push = {d.push_event_id: d for d in dones}
    assert len(by_push) == len(dones), "two eval.done for one push"
    return by_push


async def test_a_commit_fast_forwarded_from_feature_to_main_is_answered_for_main(
    bus: Bus, worker: EvalWorker, make_repo: Callable[..., GitRepo]
) -> None:
    repo = make_repo()
    commit = repo.commit(greeting="merged feature")
    on_feature = push_for(repo, commit, ref=FEATURE)
    on_main = push_for(repo, commit, ref=MAIN)  # the fast-forward merge
    async with serving(bus, [worker.subscription()]):
        await bus.publish(on_feature)
        await wait_for_dones(bus, 1)
        await bus.publish(on_main)
        await wait_for_dones(bus, 2)
        # Both pushes delivered again: no third eval.done, no second evaluation.
        await redeliver(bus, on_main)
        await redeliver(bus, on_feature)
        await all_handled(bus, 4)

    dones = _by_push(await eval_dones(bus))
    assert set(dones) == {on_feature.event_id, on_main.event_id}
    feature, main = dones[on_feature.event_id], dones[on_main.event_id]
    assert worker.evaluated == [(repo.url, commit)]
    assert (feature.ref, main.ref) == (FEATURE, MAIN)
    assert (feature.pushed_at, main.pushed_at) == (on_feature.occurred_at, on_main.occurred_at)
    assert main.msg_id != feature.msg_id
    assert main.status == feature.status == "succeeded"
    assert main.commit == feature.commit == commit
    assert main.attributes == feature.attributes
    # The main push's flake ref reaches the commit through main (the feature branch may go).
    assert feature.locked_flake_ref is not None and main.locked_flake_ref is not None
    assert "feature" in feature.locked_flake_ref and "feature" not in main.locked_flake_ref
    assert main.locked_flake_ref.replace("main", "feature") == feature.locked_flake_ref
    await settled(bus)


async def test_a_ref_moved_back_to_an_earlier_commit_is_answered_with_the_newest_push(
    bus: Bus, worker: EvalWorker, make_repo: Callable[..., GitRepo]
) -> None:
    repo = make_repo()
    a = repo.commit(greeting="a")
    b = repo.commit(greeting="b")
    pushes = [push_for(repo, a), push_for(repo, b), push_for(repo, a)]  # A -> B -> back to A
    async with serving(bus, [worker.subscription()]):
        for count, push in enumerate(pushes, 1):
            await bus.publish(push)
            await wait_for_dones(bus, count)

    dones = _by_push(await eval_dones(bus))
    first, second, back = (dones[p.event_id] for p in pushes)
    assert worker.evaluated == [(repo.url, a), (repo.url, b)]
    assert (first.commit, second.commit, back.commit) == (a, b, a)
    assert back.pushed_at == pushes[2].occurred_at
    assert first.pushed_at is not None and second.pushed_at is not None
    assert back.pushed_at > second.pushed_at > first.pushed_at
    assert back.ref == MAIN and back.attributes == first.attributes
    assert len({first.msg_id, second.msg_id, back.msg_id}) == 3
    await settled(bus)


async def test_a_failed_evaluation_answers_a_later_push_of_the_commit_as_failed(
    bus: Bus, worker: EvalWorker, make_repo: Callable[..., GitRepo]
) -> None:
    repo = make_repo()
    commit = repo.commit("{ outputs = { self }: { packages = ; }; }")
    on_feature, on_main = push_for(repo, commit, ref=FEATURE), push_for(repo, commit)
    async with serving(bus, [worker.subscription()]):
        await bus.publish(on_feature)
        await wait_for_dones(bus, 1)
        await bus.publish(on_main)
        await wait_for_dones(bus, 2)

    dones = _by_push(await eval_dones(bus))
    feature, main = dones[on_feature.event_id], dones[on_main.event_id]
    assert worker.evaluated == [(repo.url, commit)]
    assert main.status == feature.status == "failed"
    assert main.error == feature.error and "syntax error" in (main.error or "")
    assert main.ref == MAIN
    await settled(bus)


def _waits() -> float:
    sample = REGISTRY.get_sample_value(
        "niphas_eval_skipped_total", {"why": "in-progress-elsewhere"}
    )
    return sample or 0.0


async def test_a_push_of_a_commit_another_worker_is_evaluating_waits_for_its_result(
    bus: Bus,
    eval_settings: EvalSettings,
    make_repo: Callable[..., GitRepo],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    other_bus = await Bus.connect(bus.settings, name="second-worker")
    try:
        first = await build_worker(bus, eval_settings)
        second = await build_worker(other_bus, eval_settings)
        repo = make_repo()
        commit = repo.commit(greeting="one commit, two refs")
        on_feature, on_main = push_for(repo, commit, ref=FEATURE), push_for(repo, commit)

        # The first worker's evaluation holds until the second worker is seen waiting on it.
        release = asyncio.Event()
        evaluate = first._evaluator.evaluate

        async def held(repository: str, sha: str, ref: str | None) -> Evaluation:
            await release.wait()
            return await evaluate(repository, sha, ref)

        monkeypatch.setattr(first._evaluator, "evaluate", held)
        delivery = Delivery("push.received", 1, 1, {})
        waits = _waits()
        evaluating = asyncio.create_task(first.handle(on_feature, delivery))
        await eventually(lambda: bool(first.evaluated))
        waiting = asyncio.create_task(second.handle(on_main, delivery))
        await eventually(lambda: _waits() > waits or waiting.done())
        assert not waiting.done()  # not answered yet, and not dropped either
        release.set()
        await asyncio.wait_for(asyncio.gather(evaluating, waiting), 60)
    finally:
        await other_bus.close()

    dones = _by_push(await eval_dones(bus))
    assert set(dones) == {on_feature.event_id, on_main.event_id}
    assert first.evaluated == [(repo.url, commit)] and second.evaluated == []
    main = dones[on_main.event_id]
    assert (main.ref, main.commit, main.status) == (MAIN, commit, "succeeded")
    assert main.attributes == dones[on_feature.event_id].attributes
