"""`niphas up` as a user runs it: embedded NATS with the streams provisioned, found by
`niphas events`, a second run reusing the state, Ctrl-C stopping everything; the supervisor
restarting a service process that dies; services not installed reported as such."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from niphas_common.nats_server import URL_FILE
from niphas_common.service import discover
from niphas_common.up import Child, supervise
from tests.helpers import unmount_below

NIPHAS = str(Path(sys.executable).with_name("niphas"))


def start_up(state: Path) -> tuple[subprocess.Popen[bytes], str]:
    env = {k: v for k, v in os.environ.items() if k != "NATS_URL"}
    env["NIPHAS_STATE_DIR"] = str(state)
    state.mkdir(parents=True, exist_ok=True)
    log = state / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([NIPHAS, "up"], env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        for line in log.read_text().splitlines():
            if line.startswith("NATS JetStream at "):
                return proc, line.split()[-1]
        time.sleep(0.05)
    raise AssertionError(f"niphas up did not start: {log.read_text()}")


def events(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "NATS_URL"}
    env["NIPHAS_STATE_DIR"] = str(state)
    return subprocess.run(
        [NIPHAS, "events", *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    """The state dir `niphas up` runs on; whatever the services mounted there is undone."""
    yield tmp_path / "state"
    unmount_below(tmp_path)


def test_up_runs_embedded_nats_until_interrupted_and_reuses_state(state: Path) -> None:
    proc, url = start_up(state)
    try:
        assert (state / URL_FILE).read_text().strip() == url
        listed = events(state, "streams")
        assert listed.returncode == 0, listed.stderr
        for stream in ("PUSH_RECEIVED", "EVAL_DONE", "BUILD_DONE", "PATH_WANTED", "DEAD_LETTERS"):
            assert stream in listed.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    assert not (state / URL_FILE).exists()
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    refused = subprocess.run(
        [sys.executable, "-c", f"import socket; socket.create_connection(('{host}', {port}), 1)"],
        capture_output=True,
    )
    assert refused.returncode != 0  # the embedded server stopped with it

    # A second run finds the same JetStream store.
    proc, _ = start_up(state)
    try:
        assert events(state, "streams").returncode == 0
        assert (state / "nats" / "jetstream" / "jetstream").is_dir()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_supervisor_restarts_a_dead_service(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    script = f"open({str(runs)!r}, 'a').write('x'); raise SystemExit(3)"
    child = Child("flaky", [sys.executable, "-c", script])
    deadline = time.monotonic() + 20
    while (not runs.exists() or len(runs.read_text()) < 2) and time.monotonic() < deadline:
        supervise([child], dict(os.environ))
        time.sleep(0.05)
    if child.proc is not None:
        child.proc.wait()
    assert runs.read_text() == "xx"
    assert child.restarts >= 1


def test_uninstalled_service_is_reported() -> None:
    installed = discover()
    missing = [
        name for name in ("eval", "builder", "operator", "csi", "mesh") if name not in installed
    ]
    for name in missing:
        result = subprocess.run([NIPHAS, name], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2
        assert f"the {name} service is not installed" in result.stderr
