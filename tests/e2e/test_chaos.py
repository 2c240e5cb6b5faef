"""`make chaos`, CI-sized: 5 pushes through `niphas up` while 3 services are SIGKILLed at
random and NATS restarts once; then the same on a 3-server JetStream cluster, where a stream
leader is killed and restarted and one server is partitioned from the others. Volumes are
published and unpublished throughout both. The soak's own checks (nothing lost, nothing built
twice, no stuck consumer, no dead letter, the workload serves the latest push, stores verify,
every mount intact or failed with a clear CSI error that a retry resolved, nothing left mounted
or leased) decide its exit code. The check functions are shown failing on crafted input (a
loss, a duplicate, a stuck consumer, an unclear mount error, a broken closure, a leaked mount),
so a green soak means something."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from niphas_chaos import checks, leaks, mounting, recovery
from niphas_chaos.faults import Fault
from niphas_chaos.mounting import Attempt
from niphas_demo.kubelet import Pod, PodSpec
from niphas_demo.layout import Layout
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


def test_recovery_is_the_next_event_after_each_nats_fault() -> None:
    faults = [
        Fault(10.0, "kill", "builder", at_wall=1010.0, ended_s=12.0),
        Fault(20.0, "nats kill", "server 1 (leader of EVAL_DONE)", at_wall=1020.0, ended_s=24.0),
        Fault(30.0, "partition", "server 2 for 10s", at_wall=1030.0, ended_s=40.0),
        Fault(50.0, "nats kill", "server 0 (meta leader)", at_wall=1050.0, ended_s=53.0),
    ]
    found = recovery.recoveries(faults, [1005.0, 1026.5, 1031.0, 1035.0])
    assert [r.seconds for r in found] == [6.5, 1.0, None]  # the service kill is not NATS's
    assert recovery.p50_max(r.seconds for r in found) == (3.75, 6.5)
    assert recovery.p50_max([None]) is None


def test_the_baseline_waits_from_quiet_moments_only() -> None:
    # One fault from 1010 to 1014 (+10 s after): moments 1009..1024 are not quiet.
    faults = [Fault(10.0, "nats kill", "server 0", at_wall=1010.0, ended_s=14.0)]
    waits = recovery.quiet_waits(faults, [1003.5, 1030.0, 1036.0], 1000.0, 1040.0)
    # 1000..1003 wait for 1003.5; 1004..1008 and 1025..1029 for 1030; 1030..1035 for 1036.
    assert waits[:9] == [3.5, 2.5, 1.5, 0.5, 26.0, 25.0, 24.0, 23.0, 22.0]
    assert waits[9:] == [5.0, 4.0, 3.0, 2.0, 1.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]


def test_publish_errors_are_counted_during_faults() -> None:
    faults = [
        Fault(10.0, "kill", "csi", ended_s=14.0),
        Fault(30.0, "partition", "server 2 for 10s", ended_s=40.0),
    ]
    attempts = [
        Attempt(1.0, 2.0, "publish", "/nix/store/a"),
        Attempt(9.0, 11.0, "publish", "/nix/store/a", "UNAVAILABLE: the driver restarts"),
        Attempt(12.0, 13.0, "publish", "/nix/store/a"),
        Attempt(12.5, 13.0, "unpublish", "/nix/store/a", "UNAVAILABLE: x"),
        Attempt(35.0, 36.0, "publish", "/nix/store/b", "DEADLINE_EXCEEDED: fetching"),
    ]
    rates = recovery.publish_errors(attempts, faults)
    assert {k: str(v) for k, v in rates.items()} == {
        "during faults": "2/3 (67%)",
        "during NATS faults": "1/1 (100%)",
        "outside": "0/1 (0%)",
    }


def test_a_mount_error_must_name_a_status_and_a_reason() -> None:
    assert mounting.clear("UNAVAILABLE: failed to connect to all addresses")
    assert not mounting.clear("DEADLINE_EXCEEDED:")
    assert not mounting.clear("OSError(5, 'Input/output error')")


def test_a_broken_closure_is_found(tmp_path: Path) -> None:
    app, www = "a" * 32 + "-app", "b" * 32 + "-www"
    program = f"/nix/store/{app}/bin/app"
    script = f"#!/bin/sh\nexec httpd -h /nix/store/{www}\n".encode()
    node = tmp_path / "node"
    (node / "nix/store" / app / "bin").mkdir(parents=True)
    (node / "nix/store" / app / "bin/app").write_bytes(script)
    target = tmp_path / "target"
    (target / app / "bin").mkdir(parents=True)
    (target / app / "bin/app").write_bytes(script)
    spec = PodSpec([program], {}, {"storePath": f"/nix/store/{app}"}, "/nix/store")
    pod = Pod(spec, "uid", target)
    assert "absent from the volume" in str(mounting.closure_problem(pod, node))
    (target / www).mkdir()
    assert mounting.closure_problem(pod, node) is None
    (target / app / "bin/app").write_bytes(b"#!/bin/sh\n")
    assert "differ" in str(mounting.closure_problem(pod, node))
    (target / app / "bin/app").unlink()
    assert "missing" in str(mounting.closure_problem(pod, node))


def test_leaked_mounts_leases_and_views_are_counted(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    clean = leaks.count(layout, "1 0 0:1 / / rw - ext4 /dev/sda rw\n")
    assert set(clean.values()) == {0}
    pods, views = layout.pods, tmp_path / "csi/staging/views"
    mountinfo = (
        f"90 1 0:2 / {pods}/u1/volumes/kubernetes.io~csi/closure/mount ro - overlay niphas-csi ro\n"
        f"91 1 0:2 / {views}/k1 ro - overlay niphas-csi ro\n"
        f"92 1 0:3 / {tmp_path}/csi/staging/meta rw - tmpfs tmpfs rw\n"  # the node's: not a leak
    )
    (views / "k1").mkdir(parents=True)
    (layout.node_store / "nix/var/nix/gcroots/niphas/csi/csi-u1").mkdir(parents=True)
    (tmp_path / "csi/volumes").mkdir(parents=True)
    (tmp_path / "csi/volumes/csi-u1.json").write_text("{}")
    assert leaks.count(layout, mountinfo) == {
        "pod mounts": 1,
        "view mounts": 1,
        "leases": 1,
        "view dirs": 1,
        "volume records": 1,
    }


async def run_soak(tmp_path: Path, *args: str, timeout_s: float) -> tuple[int, dict[str, Any]]:
    """Run `python -m niphas_chaos` as `make chaos` does; its exit code and its outcome."""
    if os.geteuid() != 0:
        pytest.fail("the soak mounts closures and must run as root")
    state, result = tmp_path / "state", tmp_path / "result.json"
    env = dict(os.environ)
    env.pop("NATS_URL", None)
    argv = [sys.executable, "-m", "niphas_chaos", "--ci", "--state-dir", str(state)]
    argv += [*args, "--quiesce-timeout-s", "240", "--result", str(result)]
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, start_new_session=True)
    try:
        code = await wait_or_kill_group(proc, timeout_s)
    finally:
        unmount_below(tmp_path)
    outcome: dict[str, Any] = json.loads(result.read_text())
    return code, outcome


def assert_invariants(outcome: dict[str, Any], pushes: int) -> None:
    """Nothing lost or built twice, the latest push served, stores clean, every mount good or
    retried to good, nothing left."""
    assert outcome["findings"] == []
    assert len(outcome["pushes"]) == pushes
    assert outcome["events"]["build.done"] >= pushes
    assert outcome["builds_pushed"] == pushes
    latest = outcome["pushes"][-1]["version"]
    assert latest in outcome["served"]
    assert set(outcome["verified"].values()) == {"clean"}
    attempts = outcome["mounts"]["attempts"]
    assert any(a["call"] == "publish" and not a["error"] for a in attempts)
    assert all(mounting.clear(a["error"]) for a in attempts if a["error"])
    assert outcome["mounts"]["problems"] == []
    assert outcome["leaks"] and set(outcome["leaks"].values()) == {0}


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.nix
@pytest.mark.timeout(420)
async def test_chaos_soak_loses_nothing_and_builds_once(tmp_path: Path) -> None:
    args = ["--pushes", "5", "--kills", "3", "--nats-restarts", "1", "--interval-s", "4"]
    code, outcome = await run_soak(tmp_path, *args, timeout_s=400)
    assert_invariants(outcome, 5)
    assert code == 0
    faults = [f["kind"] for f in outcome["faults"]]
    assert sorted(faults) == ["kill", "kill", "kill", "nats restart"]


@pytest.mark.slow
@pytest.mark.root
@pytest.mark.nix
@pytest.mark.timeout(480)
async def test_chaos_soak_on_a_cluster_survives_leader_kills_and_a_partition(
    tmp_path: Path,
) -> None:
    args = ["--nats-cluster", "3", "--pushes", "5", "--kills", "2", "--nats-restarts", "1"]
    # 5 s apart: the NATS faults (in the middle half) come after the first Deployment is
    # rendered, so the mount loop is publishing while they happen.
    args += ["--partitions", "1", "--partition-s", "8", "--interval-s", "5"]
    code, outcome = await run_soak(tmp_path, *args, timeout_s=460)
    assert_invariants(outcome, 5)
    assert code == 0
    assert outcome["nats_servers"] == 3
    faults = {f["kind"]: f for f in outcome["faults"]}
    assert sorted(f["kind"] for f in outcome["faults"]) == [
        "kill",
        "kill",
        "nats kill",
        "partition",
    ]
    assert "leader of" in faults["nats kill"]["target"]
    # Mounts throughout: some publishes overlapped a NATS fault.
    assert outcome["publish_errors"]["during NATS faults"]["total"] > 0
    assert all(f["ended_s"] is not None for f in outcome["faults"] if f["kind"] != "kill")
    assert len(outcome["recoveries"]) == 2
