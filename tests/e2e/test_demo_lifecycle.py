"""The demo's lifecycle, as `make demo` runs it (`--ci --keep-running`, real services, nix and
mounts): a run SIGKILLed mid-life leaves `niphas up`, NATS, the services, the app and mounts
behind; the next run stops them and unmounts in seconds (one line says so) and completes;
a run while another holds the state directory refuses in one line; SIGTERM and SIGHUP stop
everything as Ctrl-C does (nothing left using the state directory, nothing mounted below
it); printed commands and paths are never wrapped."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from niphas_demo.leftovers import holders
from tests.helpers import eventually, wait_or_kill_group
from tests.niphas_csi.conftest import unmount_below

pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.nix, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
KEEPS_RUNNING = "the app and the stack keep running"


class Run:
    def __init__(self, state: Path, out: Path, *extra: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "demo")}
        env.pop("NATS_URL", None)
        self.out = out
        argv = [sys.executable, "-m", "niphas_demo", "--ci", "--state-dir", str(state), *extra]
        with out.open("wb") as sink:
            self.proc = subprocess.Popen(
                argv, env=env, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.started = time.monotonic()

    @property
    def text(self) -> str:
        return self.out.read_text(errors="replace")

    async def wait_for(self, line: str, timeout_s: float = 300) -> float:
        """Seconds since the start until `line` was printed (fails if the run ended)."""

        def printed() -> bool:
            assert self.proc.poll() is None or line in self.text, self.text
            return line in self.text

        await eventually(printed, timeout_s=timeout_s)
        return time.monotonic() - self.started


def mounts_below(root: Path) -> list[str]:
    prefix = str(root) + "/"
    points = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
    return [p for p in points if p.startswith(prefix)]


async def test_crashed_run_is_recovered_and_signals_stop_everything(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("the demo mounts closures and must run as root")
    state = tmp_path / "state"
    try:
        # A run killed without a chance to clean up leaves its stack, app and mounts.
        crashed = Run(state, tmp_path / "crashed.log", "--keep-running")
        await crashed.wait_for(KEEPS_RUNNING)
        os.kill(crashed.proc.pid, signal.SIGKILL)
        crashed.proc.wait()
        left = holders(state)
        assert any("niphas up" in cmd or " up" in cmd for cmd in left.values()), left
        assert mounts_below(state)

        # The next run stops them and unmounts within seconds, then runs the story.
        second = Run(state, tmp_path / "second.log", "--keep-running")
        recovered_after = await second.wait_for("recovered from an earlier run", 60)
        await second.wait_for(KEEPS_RUNNING)
        print(f"recovered {len(left)} leftovers {recovered_after:.1f}s after the start")
        text = second.text
        assert "stopped" in text and "unmounted" in text, text
        assert not set(left) & set(holders(state))  # the new run's processes are others

        # A run while it holds the state directory refuses in one line.
        third = Run(state, tmp_path / "third.log")
        assert await asyncio.to_thread(third.proc.wait, 60) == 1
        refusal = [line for line in third.text.splitlines() if "another demo" in line]
        assert len(refusal) == 1 and f"pid {second.proc.pid}" in refusal[0], third.text

        # SIGTERM (a `kill`, a CI timeout) stops everything as Ctrl-C does.
        second.proc.send_signal(signal.SIGTERM)
        assert await wait_or_kill_group(second.proc, 120) == 128 + signal.SIGTERM
        assert "SIGTERM: stopped the app" in second.text
        assert holders(state) == {}
        assert mounts_below(state) == []
        # Paths and commands are printed whole, on one line, whatever their length.
        repo_line = next(line for line in text.splitlines() if "sample repository" in line)
        assert f"sample repository {state}/demo/forge/demo-web " in repo_line
        assert any(line.strip() == "$ niphas rollback web" for line in text.splitlines())

        # SIGHUP (the terminal closed) in the middle of the story does too.
        hung = Run(state, tmp_path / "hung.log")
        await hung.wait_for("niphas up: NATS at")
        hung.proc.send_signal(signal.SIGHUP)
        assert await wait_or_kill_group(hung.proc, 120) == 128 + signal.SIGHUP
        assert holders(state) == {}
        assert mounts_below(state) == []
    finally:
        for pid in holders(state):
            os.kill(pid, signal.SIGKILL)
        unmount_below(tmp_path)
