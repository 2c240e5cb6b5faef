"""What a demo run leaves when it dies without cleaning up (SIGKILL, a crash, a lost
terminal), and clearing it before the next run.

A running demo holds an exclusive lock on `<state>/demo/demo.lock` for its whole life. A run
that finds the lock taken says in one line which process holds it and stops. A run that gets
the lock while processes still use the state directory (`niphas up`, NATS, the services and
the app of a crashed run: processes whose environment names the state directory or that have
a file open below it) stops them (SIGTERM, then SIGKILL) and unmounts what is mounted below
the state directory, in seconds, instead of waiting for a mesh agent that cannot start.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from niphas_demo.stack import unmount_below

STOP_GRACE_S = 10.0


class StateInUse(RuntimeError):
    """Another demo is running on this state directory."""


@contextlib.contextmanager
def demo_lock(state: Path) -> Iterator[None]:
    """Hold `<state>/demo/demo.lock` (with our pid in it) while the demo runs."""
    path = state / "demo" / "demo.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    handle: IO[str] = path.open("a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            raise StateInUse(
                f"another demo (pid {holder}) is running on {state}: stop it (kill {holder}) "
                "or pass another --state-dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


def ancestors() -> set[int]:
    """This process and the ones that started it (a shell may export NIPHAS_STATE_DIR)."""
    chain, pid = set(), os.getpid()
    while pid > 1 and pid not in chain:
        chain.add(pid)
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            break
        pid = int(status.split("\nPPid:\t", 1)[1].split("\n", 1)[0])
    return chain


def holders(state: Path) -> dict[int, str]:
    """Processes (but this one and its ancestors) using `state`: pid -> command line."""
    prefix = str(state).rstrip("/") + "/"
    marker = f"NIPHAS_STATE_DIR={state}".encode()
    mine = ancestors()
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            uses = marker in (entry / "environ").read_bytes().split(b"\0") or any(
                os.readlink(fd).startswith(prefix) for fd in (entry / "fd").iterdir()
            )
            if uses:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                found[int(entry.name)] = b" ".join(argv).decode(errors="replace").strip()
        except OSError:
            continue  # gone meanwhile, or a kernel thread
    return found


def clear(state: Path) -> list[str]:
    """Stop what a crashed run left using `state` and unmount below it; what was done."""
    left = holders(state)
    done: list[str] = []
    if left:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline and any(_alive(pid) for pid in left):
            time.sleep(0.1)
        killed = [pid for pid in left if _alive(pid)]
        for pid in killed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        names = ", ".join(f"{pid} ({cmd[:60]})" for pid, cmd in sorted(left.items()))
        done.append(f"stopped {len(left)} processes of a previous run: {names}")
    mounts = unmount_below(state)
    if mounts:
        done.append(f"unmounted {mounts} mounts below {state}")
    return done


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status  # a zombie has stopped; its parent reaps it
