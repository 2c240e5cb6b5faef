"""One agent per node state directory: an exclusive lock held for the agent's lifetime.

On start an agent removes what a killed earlier run left in its state (`leftovers`), which
would destroy the downloads of a second agent running over the same state. The lock makes the
second one refuse to start instead, naming the holder. The kernel drops it when the process
dies, so a crash never leaves it stale.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from niphas_common.errors import PermanentError


class StateInUse(PermanentError):
    """Another agent holds this node's state directory."""


class StateLock:
    def __init__(self, state: Path, node: str) -> None:
        self.path = state / "agent.lock"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StateInUse(
                f"{state} is in use by another mesh agent for node {node} (pid {holder}): "
                "one agent per node, or give each its own NIPHAS_MESH_STATE_DIR"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = -1
