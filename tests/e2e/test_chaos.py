"""`make chaos`, CI-sized: 5 pushes through `niphas up` while 3 services are SIGKILLed at
random and NATS restarts once; the soak's own checks (nothing lost, nothing built twice, no
stuck consumer, no dead letter, the workload serves the latest push, stores verify) decide its
exit code. The check functions are shown failing on a crafted loss, duplicate and stuck
consumer, so a green soak means something."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from niphas_chaos import checks
from tests.helpers import unmount_below, wait_or_kill_group

ROOT = Path(__file__).resolve().parents[2]

COMMIT_A, COMMIT_B = "a" * 40, "b" * 40
DRV_A = "/nix/store/" + "a" * 32 + "-app.drv"
DRV_B = "/nix/store/" + "b" * 32 + "-app.drv"
OUT = "/nix/store/" + "c" * 32 + "-app"


def evaluated(commit: str, drv: str) -> dict[str, Any]:
    return {"commit": commit, "status": "succeeded", "attributes": [{"drv_path": drv}]}


def built(commit: str, drv: str, status: str = "built") -> dict[str, Any]:
    return {"commit": commit, "drv_path": drv, "status": status, "outputs": [{"path": OUT}]}


def kinds(findings: list[Any]) -> list[str]:
    return [f.kind for f in findings]


def test_every_push_built_once_passes() -> None:
    evals = [evaluated(COMMIT_A, DRV_A), evaluated(COMMIT_B, DRV_B)]
    # A redelivery after the build may re-announce it as cached: not a duplicate.
    builds = [built(COMMIT_A, DRV_A), built(COMMIT_A, DRV_A, "cached"), built(COMMIT_B, DRV_B)]
    findings, outputs = checks.builds_per_push([COMMIT_A, COMMIT_B], evals, builds)
    assert findings == []
    assert outputs == {COMMIT_A: {DRV_A: OUT}, COMMIT_B: {DRV_B: OUT}}


def test_a_lost_push_is_found() -> None:
    evals = [evaluated(COMMIT_A, DRV_A), evaluated(COMMIT_B, DRV_B)]
    failed = {"commit": COMMIT_B, "drv_path": DRV_B, "status": "failed"}
    findings, _ = checks.builds_per_push(
        [COMMIT_A, COMMIT_B, "c" * 40], evals, [built(COMMIT_A, DRV_A), failed]
    )
    assert kinds(findings) == ["loss", "loss"]
    assert "failed" in findings[0].what
    assert "not evaluated" in findings[1].what


def test_a_duplicate_build_is_found() -> None:
    evals = [evaluated(COMMIT_A, DRV_A)]
    builds = [built(COMMIT_A, DRV_A), built(COMMIT_A, DRV_A)]
    findings, _ = checks.builds_per_push([COMMIT_A], evals, builds)
    assert kinds(findings) == ["duplicate"]
    log = [
        f"builder: build started: {DRV_A} (default of {COMMIT_A})",
        f"builder: build started: {DRV_A} (default of {COMMIT_A})",  # killed, rerun: fine
        f"builder: push done: {DRV_A} (3 paths to file:///cache)",
        f"builder: build started: {DRV_B} (default of {COMMIT_B})",
        f"builder: push done: {DRV_B} (3 paths to file:///cache)",
    ]
    findings, started, pushed = checks.builds_in_log(log)
    assert findings == []
    assert (started[DRV_A], pushed[DRV_A]) == (2, 1)
    findings, _, _ = checks.builds_in_log([*log, log[-1]])
    assert kinds(findings) == ["duplicate"]


def test_stuck_consumers_and_dead_letters_are_found() -> None:
    states = [
        checks.ConsumerState("EVAL_DONE", "builder", 0, 0),
        checks.ConsumerState("BUILD_DONE", "operator-build-done", 1, 0),
        checks.ConsumerState("PATH_WANTED", "mesh-demo-node", 0, 2),
    ]
    assert kinds(checks.stuck_consumers(states)) == ["stuck", "stuck"]
    assert checks.dead_letters([]) == []
    letters = checks.dead_letters(["dead.build.done", "dead.build.done"])
    assert [f.what for f in letters] == ["2 on dead.build.done"]


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.nix
@pytest.mark.timeout(420)
async def test_chaos_soak_loses_nothing_and_builds_once(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("the soak mounts closures and must run as root")
    state, result = tmp_path / "state", tmp_path / "result.json"
    env = dict(os.environ)
    env.pop("NATS_URL", None)
    argv = [sys.executable, "-m", "niphas_chaos", "--ci", "--state-dir", str(state)]
    argv += ["--pushes", "5", "--kills", "3", "--nats-restarts", "1", "--interval-s", "4"]
    argv += ["--quiesce-timeout-s", "240", "--result", str(result)]
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, start_new_session=True)
    try:
        code = await wait_or_kill_group(proc, 400)
    finally:
        unmount_below(tmp_path)
    outcome: dict[str, Any] = json.loads(result.read_text())
    assert outcome["findings"] == []
    assert code == 0
    assert len(outcome["pushes"]) == 5
    faults = [f["kind"] for f in outcome["faults"]]
    assert sorted(faults) == ["kill", "kill", "kill", "nats restart"]
    assert outcome["events"]["build.done"] >= 5
    assert outcome["builds_pushed"] == 5
    latest = outcome["pushes"][-1]["version"]
    assert latest in outcome["served"]
    assert set(outcome["verified"].values()) == {"clean"}
