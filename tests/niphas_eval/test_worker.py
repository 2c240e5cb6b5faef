"""Evaluation workers against a real nats-server and the real nix, with local git
repositories as the forge's repos: each push is evaluated at its own commit (not the branch
head), failures (evaluation error, timeout, memory, disallowed ref) give exactly one failed
`eval.done` and are not redelivered, a (repository, commit) is evaluated once however often
it is pushed, and two workers share the load without evaluating any event twice."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from niphas_common.bus.bus import Bus
from niphas_common.nix.runner import NixRunner
from niphas_eval.app import build_worker
from niphas_eval.settings import EvalSettings
from niphas_eval.worker import EvalWorker
from niphas_schemas import EvalDone, PushReceived
from tests.helpers import serving
from tests.niphas_eval.conftest import GitRepo, eval_dones, flake_nix, push_for
from tests.nix_harness import nix_system

pytestmark = pytest.mark.nix

SYSTEM = nix_system()


async def wait_for_dones(bus: Bus, count: int, timeout_s: float = 60.0) -> list[EvalDone]:
    found: list[EvalDone] = []

    async def poll() -> None:
        nonlocal found
        while len(found) < count:
            found = await eval_dones(bus)
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), timeout_s)
    return found


async def settled(bus: Bus, durable: str = "eval-workers") -> None:
    """Every delivered push acked (none pending a redelivery)."""
    info = await bus.js.consumer_info("PUSH_RECEIVED", durable)
    assert info.num_pending == 0
    assert info.num_ack_pending == 0
    assert info.num_redelivered == 0


def out_path(nix_runner: NixRunner, repo: GitRepo, commit: str, attr: str = "default") -> str:
    ref = f"git+{repo.url}?ref=refs/heads/main&rev={commit}#packages.{SYSTEM}.{attr}.outPath"
    return str(nix_runner.run("nix", "eval", "--raw", "--no-write-lock-file", ref).text)


async def test_two_quick_pushes_are_each_evaluated_at_their_own_commit(
    bus: Bus, worker: EvalWorker, make_repo: Callable[..., GitRepo], nix_runner: NixRunner
) -> None:
    repo = make_repo()
    first = repo.commit(greeting="first version")
    second = repo.commit(greeting="second version")  # the branch head moved on already

    pushes = {first: push_for(repo, first), second: push_for(repo, second)}
    async with serving(bus, [worker.subscription()]):
        await bus.publish(pushes[first])
        await bus.publish(pushes[second])
        dones = await wait_for_dones(bus, 2)
    by_commit = {d.commit: d for d in dones}
    assert set(by_commit) == {first, second}
    # Each result says when its commit was pushed, so results arriving out of order can
    # still be ordered.
    for commit, done in by_commit.items():
        assert done.pushed_at == pushes[commit].occurred_at
    outs = {}
    for commit, done in by_commit.items():
        assert done.status == "succeeded", done.error
        [attr] = done.attributes
        assert (attr.attribute, attr.attr_path) == ("default", f"packages.{SYSTEM}.default")
        assert (attr.name, attr.system, attr.main_program) == ("greeter", SYSTEM, "greeting")
        assert attr.drv_path is not None and attr.drv_path.endswith("-greeter.drv")
        assert done.ref == "refs/heads/main"
        assert done.locked_flake_ref is not None
        assert (
            f"rev={commit}" in done.locked_flake_ref and "narHash=sha256-" in done.locked_flake_ref
        )
        outs[commit] = attr.outputs["out"]
        # What nix itself says that commit's package is:
        assert outs[commit] == out_path(nix_runner, repo, commit)
    assert outs[first] != outs[second]
    await settled(bus)


async def test_push_without_commit_evaluates_the_refs_head(
    bus: Bus, worker: EvalWorker, make_repo: Callable[..., GitRepo]
) -> None:
    repo = make_repo()
    repo.commit(greeting="old")
    head = repo.commit(greeting="new")
    push = push_for(repo, None, ref=None)  # operator: "evaluate the default branch"
    async with serving(bus, [worker.subscription()]):
        await bus.publish(push)
        [done] = await wait_for_dones(bus, 1)
    assert done.status == "succeeded", done.error
    assert (done.commit, done.ref) == (head, "refs/heads/main")
    # The head as resolved by the worker, no earlier than the request.
    assert done.pushed_at is not None and done.pushed_at >= push.occurred_at


async def test_attribute_errors_stay_per_attribute_and_niphas_output_is_evaluated(
    bus: Bus, worker: EvalWorker, make_repo: Callable[..., GitRepo]
) -> None:
    repo = make_repo()
    commit = repo.commit(
        flake_nix(
            repo.tools,
            packages='broken = throw "this package is broken on purpose"; notes = "text";',
            outputs="niphas.${system} = { web = app; };",
        )
    )
    async with serving(bus, [worker.subscription()]):
        await bus.publish(push_for(repo, commit))
        [done] = await wait_for_dones(bus, 1)
    assert done.status == "succeeded", done.error
    attrs = {a.attr_path: a for a in done.attributes}
    assert set(attrs) == {
        f"packages.{SYSTEM}.broken", f"packages.{SYSTEM}.default", f"packages.{SYSTEM}.notes",
        f"niphas.{SYSTEM}.web",
    }  # fmt: skip
    assert attrs[f"packages.{SYSTEM}.default"].error is None
    assert "broken on purpose" in (attrs[f"packages.{SYSTEM}.broken"].error or "")
    assert attrs[f"packages.{SYSTEM}.notes"].error == "not a derivation"
    web = attrs[f"niphas.{SYSTEM}.web"]
    assert web.attribute == "web" and web.error is None
    assert web.outputs == attrs[f"packages.{SYSTEM}.default"].outputs


@pytest.mark.parametrize(
    ("packages", "reason"),
    [
        (None, "syntax error"),
        ("other = self.nonexistent;", "attribute 'nonexistent' missing"),
    ],
    ids=["syntax-error", "missing-attribute"],
)
async def test_evaluation_error_gives_one_failed_eval_done(
    bus: Bus,
    worker: EvalWorker,
    make_repo: Callable[..., GitRepo],
    packages: str | None,
    reason: str,
) -> None:
    repo = make_repo()
    if packages is None:
        flake = "{ outputs = { self }: { packages = ; }; }"
    else:
        flake = flake_nix(repo.tools, packages=packages)
    commit = repo.commit(flake)
    async with serving(bus, [worker.subscription()]):
        await bus.publish(push_for(repo, commit))
        [done] = await wait_for_dones(bus, 1)
        await asyncio.sleep(0.5)  # nothing more arrives
    assert done.status == "failed"
    assert reason in (done.error or "")
    assert done.commit == commit
    assert len(await eval_dones(bus)) == 1
    await settled(bus)


@pytest.mark.slow
async def test_timeout_gives_one_failed_eval_done(
    bus: Bus, eval_settings: EvalSettings, make_repo: Callable[..., GitRepo]
) -> None:
    worker = await build_worker(bus, eval_settings.model_copy(update={"eval_timeout_s": 1.0}))
    repo = make_repo()
    # CPU-bound with little memory (nix also ignores SIGTERM here: the runner SIGKILLs it).
    slow = (
        "slow = builtins.foldl' (a: i: builtins.foldl' (b: j: b + j) a "
        "(builtins.genList (x: x) 100000)) 0 (builtins.genList (x: x) 100000);"
    )
    commit = repo.commit(flake_nix(repo.tools, packages=slow))
    async with serving(bus, [worker.subscription()]):
        await bus.publish(push_for(repo, commit))
        [done] = await wait_for_dones(bus, 1, timeout_s=30)
    assert done.status == "failed"
    assert "timed out after 1 s" in (done.error or "")
    await settled(bus)


async def test_memory_bound_gives_one_failed_eval_done(
    bus: Bus, eval_settings: EvalSettings, make_repo: Callable[..., GitRepo]
) -> None:
    worker = await build_worker(bus, eval_settings.model_copy(update={"memory_limit_mb": 400}))
    repo = make_repo()
    hog = "hog = builtins.length (builtins.genList (x: [ x x ]) 100000000);"
    commit = repo.commit(flake_nix(repo.tools, packages=hog))
    async with serving(bus, [worker.subscription()]):
        await bus.publish(push_for(repo, commit))
        [done] = await wait_for_dones(bus, 1, timeout_s=60)
    assert done.status == "failed"
    assert "out of memory" in (done.error or "")
    await settled(bus)


async def test_disallowed_ref_gives_one_failed_eval_done_without_evaluating(
    bus: Bus, worker: EvalWorker, make_repo: Callable[..., GitRepo], tmp_path: Path
) -> None:
    repo = make_repo()
    commit = repo.commit()
    outside = repo.dir.parent.parent / "elsewhere"
    repo.dir.rename(outside)  # same repository, but not under the allowed glob
    push = push_for(repo, commit).model_copy(update={"repository": f"file://{outside}"})
    async with serving(bus, [worker.subscription()]):
        await bus.publish(push)
        [done] = await wait_for_dones(bus, 1)
        await asyncio.sleep(0.5)
    assert done.status == "failed"
    assert "NIPHAS_EVAL_ALLOWED_REFS" in (done.error or "")
    assert worker.evaluated == []
    assert len(await eval_dones(bus)) == 1
    await settled(bus)


async def test_empty_allowlist_denies_everything(
    bus: Bus, eval_settings: EvalSettings, make_repo: Callable[..., GitRepo]
) -> None:
    worker = await build_worker(bus, eval_settings.model_copy(update={"allowed_refs": []}))
    repo = make_repo()
    async with serving(bus, [worker.subscription()]):
        await bus.publish(push_for(repo, None))  # not even resolved
        [done] = await wait_for_dones(bus, 1)
    assert done.status == "failed"
    assert "deny by default" in (done.error or "")
    assert worker.evaluated == []


async def test_same_commit_pushed_again_is_evaluated_once_and_every_push_answered(
    bus: Bus, eval_settings: EvalSettings, worker: EvalWorker, make_repo: Callable[..., GitRepo]
) -> None:
    repo = make_repo()
    commit = repo.commit()
    # Four pushes of the same commit (e.g. a push of it to another branch, a webhook sent again
    # outside the stream's duplicate window), the first two at once.
    pushes = [push_for(repo, commit), push_for(repo, commit, ref="refs/heads/other")]
    async with serving(bus, [worker.subscription()]):
        for push in pushes:
            await bus.publish(push)
        await wait_for_dones(bus, 2)
        pushes.append(push_for(repo, commit))
        await bus.publish(pushes[-1])
        await wait_for_dones(bus, 3)
    # A worker started later (another replica, or after a restart) reuses the result too.
    later = await build_worker(bus, eval_settings)
    async with serving(bus, [later.subscription()]):
        pushes.append(push_for(repo, commit))
        await bus.publish(pushes[-1])
        dones = await wait_for_dones(bus, 4)
    assert worker.evaluated == [(repo.url, commit)]
    assert later.evaluated == []
    assert sorted(d.push_event_id for d in dones) == sorted(p.event_id for p in pushes)
    assert len({d.msg_id for d in dones}) == 4
    assert all(d.attributes == dones[0].attributes for d in dones)
    await settled(bus)


async def test_two_workers_share_the_load_and_evaluate_nothing_twice(
    bus: Bus, eval_settings: EvalSettings, make_repo: Callable[..., GitRepo]
) -> None:
    other_bus = await Bus.connect(bus.settings, name="second-worker")
    try:
        one_settings = eval_settings.model_copy(update={"concurrency": 1})
        first = await build_worker(bus, one_settings)
        second = await build_worker(other_bus, one_settings)
        repos = [make_repo(f"app{i}") for i in range(2)]
        commits = [(repo, repo.commit(greeting=f"v{i}")) for repo in repos for i in range(4)]
        async with (
            serving(bus, [first.subscription()]),
            serving(other_bus, [second.subscription()]),
        ):
            for repo, commit in commits:
                await bus.publish(push_for(repo, commit))
            dones = await wait_for_dones(bus, len(commits), timeout_s=90)
    finally:
        await other_bus.close()
    assert first.evaluated and second.evaluated, (first.evaluated, second.evaluated)
    together = first.evaluated + second.evaluated
    assert sorted(together) == sorted((repo.url, commit) for repo, commit in commits)
    assert len(dones) == len(commits)
    assert all(d.status == "succeeded" for d in dones)
    await settled(bus)


async def test_eval_done_is_readable_json_with_the_contract_fields(
    bus: Bus, worker: EvalWorker, make_repo: Callable[..., GitRepo]
) -> None:
    repo = make_repo()
    commit = repo.commit()
    push = push_for(repo, commit)
    async with serving(bus, [worker.subscription()]):
        await bus.publish(push)
        [done] = await wait_for_dones(bus, 1)
    assert done.push_event_id == push.event_id
    assert done.repository == repo.url
    body = json.loads(done.model_dump_json())
    assert body["attributes"][0]["outputs"]["out"].startswith("/nix/store/")


async def test_result_too_large_for_the_bus_is_one_failed_eval_done(
    bus: Bus, worker: EvalWorker, make_repo: Callable[..., GitRepo], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(worker, "_limit", lambda: 2000)  # as if max_payload were tiny
    repo = make_repo()
    many = " ".join(f"copy{i} = app;" for i in range(20))
    commit = repo.commit(flake_nix(repo.tools, packages=many))
    async with serving(bus, [worker.subscription()]):
        await bus.publish(push_for(repo, commit))
        [done] = await wait_for_dones(bus, 1)
    assert done.status == "failed"
    assert "exceeds the NATS server's max_payload" in (done.error or "")
    await settled(bus)


async def test_unreachable_repository_is_retried_then_answered_once(
    bus: Bus, worker: EvalWorker, tmp_path: Path
) -> None:
    # Allowed by the glob, but there is no repository: `git ls-remote` fails like a network
    # error would. Retried with backoff, then on the last delivery one failed eval.done.
    worker.spec = dataclasses.replace(worker.spec, backoff_s=(0.1,))
    missing = PushReceived(
        forge="niphas", repository=f"file://{tmp_path}/forge/missing", delivery_id="op-1"
    )
    async with serving(bus, [worker.subscription()]):
        await bus.publish(missing)
        [done] = await wait_for_dones(bus, 1, timeout_s=30)
        await asyncio.sleep(0.5)
    assert done.status == "failed"
    assert "gave up" in (done.error or "") and "ls-remote" in (done.error or "")
    assert done.commit == "0" * 40
    info = await bus.js.consumer_info("PUSH_RECEIVED", "eval-workers")
    assert info.num_ack_pending == 0 and info.num_pending == 0
    assert info.delivered.consumer_seq == worker.spec.max_deliver  # retried, then answered
    assert len(await eval_dones(bus)) == 1
    dead = await bus.js.stream_info("DEAD_LETTERS")
    assert dead.state.messages == 0
