"""One CPU share per simulated node: the processes of each node (its agent and the `nix`
processes the agent starts) in a cgroup of their own with a CPU quota.

When several nodes are simulated on one host they share its cores, so eight nodes doing the
work of eight imports cannot finish as fast as one node that has the host to itself: that
measures the host, not the mesh. With a quota per node, one node alone gets no more CPU than
each node among eight, as on separate machines. cgroup v2 (`cpu.max`) or v1
(`cpu.cfs_quota_us`); `CpuShares.create` returns None when neither can be written (not root,
no cpu controller), and the benchmark says so.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

PERIOD_US = 100_000
V2_ROOT = Path("/sys/fs/cgroup")
V1_ROOT = Path("/sys/fs/cgroup/cpu")


class CpuShares:
    def __init__(self, base: Path, v2: bool) -> None:
        self.base = base
        self.v2 = v2
        self.groups: dict[str, Path] = {}

    @classmethod
    def create(cls, name: str) -> CpuShares | None:
        """A parent cgroup `name-<pid>` for the nodes' groups, or None if none can be made."""
        leaf = f"{name}-{os.getpid()}"
        try:
            if "cpu" in _read(V2_ROOT / "cgroup.controllers").split():
                base = V2_ROOT / leaf
                base.mkdir()
                (base / "cgroup.subtree_control").write_text("+cpu")
                return cls(base, v2=True)
            if (V1_ROOT / "cpu.cfs_quota_us").exists():
                base = V1_ROOT / leaf
                base.mkdir()
                return cls(base, v2=False)
        except OSError:
            return None
        return None

    def wrap(self, node: str, argv: list[str]) -> list[str]:
        """`argv` started inside the node's group: a shell moves itself there, then execs, so
        no process of the node ever runs outside it."""
        group = self.groups.get(node)
        if group is None:
            group = self.groups[node] = self.base / node
            group.mkdir()
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(group / "cgroup.procs"), *argv]

    def limit(self, cores: float | None) -> None:
        """Give every node `cores` of CPU time (None: no limit)."""
        for group in self.groups.values():
            if self.v2:
                quota = "max" if cores is None else str(int(cores * PERIOD_US))
                (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
            else:
                (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
                quota = "-1" if cores is None else str(int(cores * PERIOD_US))
                (group / "cpu.cfs_quota_us").write_text(quota)

    def throttled_s(self, node: str) -> float:
        """Seconds the node's group has been held back by its quota so far (0 if unknown)."""
        group = self.groups.get(node)
        if group is None:
            return 0.0
        # v2 counts microseconds, v1 nanoseconds.
        key, scale = ("throttled_usec", 1e-6) if self.v2 else ("throttled_time", 1e-9)
        for line in _read(group / "cpu.stat").splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value) * scale
        return 0.0

    def remove(self) -> None:
        """Remove the groups (their processes must have exited)."""
        for group in [*self.groups.values(), self.base]:
            with contextlib.suppress(OSError):
                group.rmdir()


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
