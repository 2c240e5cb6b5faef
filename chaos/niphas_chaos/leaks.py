"""What the CSI driver holds for volumes, counted from the outside once every pod is gone:
mounts (from /proc/self/mountinfo) below the kubelet's pods dir and the driver's views, and
the driver's lease, view and volume-record entries on disk. After the soak all must be zero;
the driver's staging area itself (a private mount point and the meta tmpfs) is not a leak, it
lives as long as the node."""

from __future__ import annotations

from pathlib import Path

from niphas_common.leases import leases_root
from niphas_demo.layout import Layout


def mount_points(mountinfo: str) -> list[str]:
    """The mount points of /proc/self/mountinfo's lines (octal escapes undone)."""
    points = []
    for line in mountinfo.splitlines():
        fields = line.split(" ")
        if len(fields) > 4:
            points.append(fields[4].encode().decode("unicode_escape"))
    return points


def below(points: list[str], root: Path) -> int:
    prefix = str(root).rstrip("/") + "/"
    return sum(1 for p in points if p.startswith(prefix))


def entries(directory: Path, pattern: str = "*") -> int:
    return sum(1 for _ in directory.glob(pattern)) if directory.is_dir() else 0


def count(layout: Layout, mountinfo: str | None = None) -> dict[str, int]:
    """Name -> how many; every one 0 when nothing leaked."""
    points = mount_points(mountinfo or Path("/proc/self/mountinfo").read_text())
    staging = layout.state / "csi" / "staging"
    return {
        "pod mounts": below(points, layout.pods),
        "view mounts": below(points, staging / "views"),
        "leases": entries(leases_root(layout.node_store)),
        "view dirs": entries(staging / "views") + entries(staging / "meta"),
        "volume records": entries(layout.state / "csi" / "volumes", "*.json"),
    }
