"""Small helpers shared by the tests of every package (import them; they are not fixtures)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from niphas_common.bus.bus import Bus
from niphas_common.bus.consumer import Subscription


async def eventually(check: Callable[[], bool], timeout_s: float = 15.0) -> None:
    """Wait until `check()` holds (a readiness wait, not a speed assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def serving(bus: Bus, subscriptions: Sequence[Subscription[Any]]) -> AsyncIterator[None]:
    """Run consumers in this process for the duration of the block, then stop and drain."""
    stop = asyncio.Event()
    task = asyncio.create_task(bus.serve(subscriptions, stop, fetch_timeout_s=0.1))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def unmount_below(root: Path) -> None:
    """Lazily unmount everything mounted under `root` (deepest first), e.g. what a CSI driver
    started by a test left staged, so the temp dir can be removed."""
    prefix = str(root.resolve()) + "/"
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        target = line.split()[4].encode().decode("unicode_escape")
        if target.startswith(prefix):
            mounts.append(target)
    for target in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True, check=False)


async def wait_or_kill_group(proc: subprocess.Popen[Any], timeout_s: float) -> int:
    """Wait for a process started with `start_new_session=True`; past the timeout (or when
    the test is interrupted) SIGKILL its whole process group so no service outlives the test."""
    try:
        return await asyncio.to_thread(proc.wait, timeout_s)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def terminate(proc: subprocess.Popen[Any], kill: Callable[[], None] | None = None) -> None:
    """SIGTERM a running process and wait up to 20 s for it; then `kill` (default: SIGKILL
    the process and wait for it)."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        if kill is not None:
            kill()
        else:
            proc.kill()
            proc.wait(10)
