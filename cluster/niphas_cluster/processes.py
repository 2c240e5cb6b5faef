"""The node's daemons: started detached (so `make cluster` can return while they run), each
with a pid file and a log, and stopped in reverse order of start."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from .layout import Layout

ENV = {
    # kubelet's ECR credential provider probes the cloud metadata address at start; nothing
    # here may leave loopback and the node's own pod network.
    "AWS_EC2_METADATA_DISABLED": "true",
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
}

ORDER = (
    "containerd",
    "etcd",
    "kube-apiserver",
    "dnsmasq",
    "dns-sync",
    "kube-controller-manager",
    "kube-scheduler",
    "kube-proxy",
    "kubelet",
)


_children: dict[int, subprocess.Popen[bytes]] = {}
"""Daemons this process started: kept so they are reaped here, not left as zombies or
reported as leaked by Popen's destructor (they outlive the process by design)."""


class NodeStartError(RuntimeError):
    """The node could not start; the message names the cause in one line."""


def spawn(layout: Layout, name: str, argv: list[str]) -> int:
    layout.logs.mkdir(parents=True, exist_ok=True)
    layout.pids.mkdir(parents=True, exist_ok=True)
    with (layout.logs / f"{name}.log").open("ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=ENV,
            start_new_session=True,
        )
    _children[proc.pid] = proc
    (layout.pids / f"{name}.pid").write_text(f"{proc.pid}\n")
    return proc.pid


def pid_of(layout: Layout, name: str) -> int | None:
    try:
        pid = int((layout.pids / f"{name}.pid").read_text())
    except (OSError, ValueError):
        return None
    return pid if alive(pid) else None


def alive(pid: int) -> bool:
    child = _children.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def running(layout: Layout) -> dict[str, int]:
    return {name: pid for name in ORDER if (pid := pid_of(layout, name)) is not None}


def stop(layout: Layout, name: str, grace_s: float = 10.0) -> None:
    pid = pid_of(layout, name)
    if pid is not None:
        _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if alive(pid):
            _signal_group(pid, signal.SIGKILL)
            while alive(pid):
                time.sleep(0.05)
    with contextlib.suppress(FileNotFoundError):
        (layout.pids / f"{name}.pid").unlink()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    # Each daemon leads its own session; its group holds whatever it started (shims run in
    # their own sessions and are handled through containerd).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def log_tail(layout: Layout, name: str, lines: int = 20) -> str:
    path = layout.logs / f"{name}.log"
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def died(layout: Layout, name: str) -> NodeStartError:
    """The error for a daemon that exited during start: its last meaningful log line."""
    # Go programs end with a stack trace: the cause is the last log line before it.
    lines = [line for line in log_tail(layout, name, 200).splitlines() if not _is_trace(line)]
    cause = next(
        (line for line in reversed(lines) if any(w in line.lower() for w in _CAUSE_WORDS)),
        lines[-1] if lines else "no output",
    )
    return NodeStartError(
        f"{name} exited during start: {cause.strip()[:400]} (log: {layout.logs / name}.log)"
    )


def _is_trace(line: str) -> bool:
    text = line.strip()
    return (
        not text
        or text.startswith(("goroutine ", "k8s.io/", "main.", "runtime.", "created by ", "/"))
        or (text.endswith(")") and "(" in text and " " not in text)
    )


_CAUSE_WORDS = ("error", "fatal", "failed", "address already in use", "permission denied")
