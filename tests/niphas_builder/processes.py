"""Builder processes for the multi-process tests: the real `niphas builder` command, its log
in a file (the tests count "build started:" and "push done:" lines), killed with its whole
process tree the way a node losing the pod would."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.helpers import terminate
from tests.nix_harness import CacheKey


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (nix runs in its own session, out of reach of killpg)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class BuilderProcess:
    def __init__(self, name: str, workdir: Path, nats_url: str, key: CacheKey) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        env = {
            **os.environ,
            "NATS_URL": nats_url,
            "NIPHAS_BUILDER_NAME": name,
            "NIPHAS_BUILDER_STATE_DIR": str(workdir / "state"),
            "NIPHAS_BUILDER_CACHE_URL": f"file://{workdir / 'cache'}",
            "NIPHAS_BUILDER_SECRET_KEY_FILE": str(key.secret_file),
            "NIPHAS_BUILDER_LEASE_TTL_S": "2",
            "NIPHAS_BUILDER_ACK_WAIT_S": "2",
            "NIPHAS_BUILDER_CONCURRENCY": "1",
        }
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "niphas_builder"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def count(self, marker: str) -> int:
        return sum(marker in line for line in self.log().splitlines())

    def kill(self) -> None:
        """SIGKILL the builder and everything it started, at once."""
        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        terminate(self.proc, self.kill)
