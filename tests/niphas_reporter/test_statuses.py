"""Commit statuses: the reporter, consuming the real subjects on a real nats-server, posts
one context per stage (eval, each built attribute, each workload's rollout) to GitHub, Gitea
and GitLab as each
documents its API (checked by a fake forge on loopback); a forge answering 5xx is retried
with backoff, one that is down or refuses never holds up the events (all acked), and no
token reaches a log."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import pytest
from prometheus_client import REGISTRY

from niphas_common.bus.bus import Bus
from niphas_reporter.app import wired
from niphas_reporter.reporter import Reporter
from niphas_reporter.settings import ReporterSettings
from niphas_schemas import (
    BuildDone,
    BuiltOutput,
    EvalDone,
    EvaluatedAttribute,
    PushReceived,
    WorkloadRolled,
)
from tests.helpers import eventually, serving

from .conftest import REPOS, TOKENS
from .fake_forge import FakeForge

COMMIT, NEWER = "c" * 40, "d" * 40
DRV = "/nix/store/" + "q" * 32 + "-app.drv"
OUT = "/nix/store/" + "r" * 32 + "-app"
NAR_HASH = "sha256:" + "1" * 52


@contextlib.asynccontextmanager
async def reporting(bus: Bus, settings: ReporterSettings) -> AsyncIterator[Reporter]:
    async with wired(bus, settings) as reporter, serving(bus, reporter.subscriptions()):
        yield reporter


def push(forge: str, commit: str | None = COMMIT) -> PushReceived:
    return PushReceived(
        forge=forge,
        repository=REPOS[forge],
        ref="refs/heads/main",
        commit=commit,
        delivery_id=f"d-{forge}-{commit}",
    )


def evaluated(forge: str) -> EvalDone:
    return EvalDone(
        push_event_id="p1",
        repository=REPOS[forge],
        ref="refs/heads/main",
        commit=COMMIT,
        status="succeeded",
        attributes=(
            EvaluatedAttribute(
                attribute="app",
                attr_path="packages.x86_64-linux.app",
                system="x86_64-linux",
                drv_path=DRV,
                outputs={"out": OUT},
            ),
            EvaluatedAttribute(
                attribute="broken",
                attr_path="packages.x86_64-linux.broken",
                system="x86_64-linux",
                error="error: undefined variable 'x'",
            ),
        ),
    )


def built(forge: str, status: str, tail: str | None = None) -> BuildDone:
    outputs = (
        ()
        if status == "failed"
        else (BuiltOutput(name="out", path=OUT, nar_hash=NAR_HASH, nar_size=10),)
    )
    return BuildDone(
        eval_event_id="e1",
        repository=REPOS[forge],
        ref="refs/heads/main",
        commit=COMMIT,
        attribute="app",
        drv_path=DRV,
        status=status,
        outputs=outputs,
        duration_s=3.2,
        log_tail=tail,
    )


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_each_forge_gets_one_status_per_stage_as_its_api_documents(
    bus: Bus,
    forge: FakeForge,
    reporter_settings: ReporterSettings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    finals = {
        "github": built("github", "built"),
        "gitea": built("gitea", "failed", "error: builder failed\nexit 1"),
        "gitlab": built("gitlab", "failed", f"superseded by {NEWER}"),
    }
    async with reporting(bus, reporter_settings):
        for kind in REPOS:
            await bus.publish(push(kind))
        await eventually(lambda: len(forge.posted) == 3)
        for kind in REPOS:
            await bus.publish(evaluated(kind))
        await eventually(lambda: len(forge.posted) == 3 + 3 * 3)
        for kind in REPOS:
            await bus.publish(finals[kind])
        await eventually(lambda: len(forge.posted) == 3 + 3 * 3 + 3)

    assert forge.violations == []
    by = {
        (p.forge, p.context): [
            x.body for x in forge.posted if (x.forge, x.context) == (p.forge, p.context)
        ]
        for p in forge.posted
    }
    assert [b["state"] for b in by["github", "niphas/eval"]] == ["pending", "success"]
    assert [b["state"] for b in by["github", "niphas/build/app"]] == ["pending", "success"]
    assert [b["state"] for b in by["github", "niphas/build/broken"]] == ["failure"]
    assert "undefined variable" in by["github", "niphas/build/broken"][0]["description"]
    # A failed build links straight to its log.
    failed = by["gitea", "niphas/build/app"][-1]
    assert failed["state"] == "failure"
    assert failed["target_url"] == "http://reporter.test:8095/logs/drv/" + "q" * 32
    # GitLab says canceled, with the newer commit; its ref is the branch name.
    cancelled = by["gitlab", "niphas/build/app"][-1]
    assert cancelled["state"] == "canceled" and NEWER[:12] in cancelled["description"]
    assert cancelled["ref"] == "main"
    assert {p.project for p in forge.posted if p.forge == "gitlab"} == {"acme/lab"}
    assert {p.sha for p in forge.posted} == {COMMIT}
    for token in TOKENS.values():
        assert token not in caplog.text


async def test_a_forge_answering_5xx_is_retried_with_backoff(
    bus: Bus, forge: FakeForge, reporter_settings: ReporterSettings
) -> None:
    retried = sample("niphas_reporter_retries_total", forge="github")
    forge.fail_next(3)  # attempts=4: the fourth try gets through
    async with reporting(bus, reporter_settings):
        await bus.publish(push("github"))
        await eventually(lambda: len(forge.posted) == 1)
    assert forge.requests == 4 and forge.states("niphas/eval") == ["pending"]
    assert sample("niphas_reporter_retries_total", forge="github") - retried == 3


async def test_a_forge_down_or_refusing_never_holds_up_the_events(
    bus: Bus, forge: FakeForge, reporter_settings: ReporterSettings
) -> None:
    dropped = sample("niphas_reporter_statuses_total", forge="github", outcome="dropped")
    refused = sample("niphas_reporter_statuses_total", forge="gitea", outcome="refused")
    forge.fail_next(1000, only="github")  # down for good: every try answers 503
    forge.tokens["acme/tea"] = "rotated"  # Gitea refuses the token we have: no retry
    async with reporting(bus, reporter_settings) as reporter:
        await bus.publish(push("github"))
        await bus.publish(push("gitea"))
        await eventually(lambda: forge.requests >= 2)
        await bus.publish(evaluated("github"))

        async def all_acked() -> bool:
            for durable in ("reporter-push", "reporter-eval"):
                stream = "PUSH_RECEIVED" if durable.endswith("push") else "EVAL_DONE"
                info = await bus.js.consumer_info(stream, durable)
                if info.num_pending or info.num_ack_pending:
                    return False
            return True

        for _ in range(300):
            if await all_acked():
                break
            await reporter.poster.idle()
        assert await all_acked()
        await reporter.poster.idle()
    statuses = 1 + 3  # github: push (eval pending), eval.done (eval, app, broken)
    assert forge.posted == []
    assert (
        sample("niphas_reporter_statuses_total", forge="github", outcome="dropped") - dropped
        == statuses
    )
    assert sample("niphas_reporter_statuses_total", forge="gitea", outcome="refused") - refused == 1
    assert forge.violations == ["gitea: bad credentials for acme/tea"]


async def test_a_pending_status_never_follows_a_final_one(
    bus: Bus, forge: FakeForge, reporter_settings: ReporterSettings
) -> None:
    """The reporter's consumers are independent: build.done may come before eval.done."""
    async with reporting(bus, reporter_settings) as reporter:
        await bus.publish(push("github"))
        await bus.publish(built("github", "built"))
        await eventually(lambda: len(forge.posted) == 2)
        await bus.publish(evaluated("github"))
        await eventually(lambda: len(forge.posted) == 4)
        await reporter.poster.idle()
    assert forge.states("niphas/build/app") == ["success"]


def test_a_build_cancelled_while_building_says_so() -> None:
    from niphas_reporter.statuses import Statuses

    statuses = Statuses("niphas", lambda drv: f"http://logs/{drv[-12:]}")
    tail = f"superseded by {NEWER}: cancelled while building"
    [status] = statuses.for_build(built("github", "failed", tail))
    assert (status.state, status.description) == (
        "cancelled",
        f"cancelled: superseded by {NEWER[:12]}",
    )
    assert status.target_url == f"http://logs/{DRV[-12:]}"


def rolled(forge: str, phase: str, reason: str, commit: str = COMMIT) -> WorkloadRolled:
    return WorkloadRolled(
        namespace="apps",
        name="web",
        repository=REPOS[forge],
        ref="refs/heads/main",
        commit=commit,
        store_path=OUT,
        phase=phase,
        reason=reason,
        message=f"{reason} happened",
    )


async def test_a_workload_rollout_is_one_context_pending_then_final(
    bus: Bus, forge: FakeForge, reporter_settings: ReporterSettings
) -> None:
    deploy = "niphas/deploy/apps/web"
    async with reporting(bus, reporter_settings) as reporter:
        for kind in ("github", "gitlab"):
            await bus.publish(rolled(kind, "Provisioning", "RollingOut"))
        await eventually(lambda: len(forge.posted) == 2)
        for kind in ("github", "gitlab"):
            await bus.publish(rolled(kind, "Running", "MinimumReplicasAvailable"))
        await eventually(lambda: len(forge.posted) == 4)
        # A newer commit's build failed: the running commit's rollout is as it was.
        await bus.publish(rolled("github", "Degraded", "BuildFailed"))
        # Its replicas going away is this commit's rollout failing.
        await bus.publish(rolled("github", "Degraded", "ReplicasUnavailable", NEWER))
        await eventually(lambda: len(forge.posted) == 5)
        await reporter.poster.idle()

    assert forge.violations == []
    github = [
        p.body for p in forge.posted if (p.forge, p.context, p.sha) == ("github", deploy, COMMIT)
    ]
    assert [b["state"] for b in github] == ["pending", "success"]
    assert "RollingOut" in github[0]["description"]
    assert github[1]["target_url"] == f"http://reporter.test:8095/logs/push/{COMMIT}"
    gitlab = [p.body for p in forge.posted if (p.forge, p.context) == ("gitlab", deploy)]
    assert [b["state"] for b in gitlab] == ["pending", "success"] and gitlab[0]["ref"] == "main"
    [failed] = [p for p in forge.posted if p.sha == NEWER]
    assert (failed.context, failed.sha, failed.body["state"]) == (deploy, NEWER, "failure")
    assert "ReplicasUnavailable" in failed.body["description"]
