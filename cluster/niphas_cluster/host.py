"""What the node changes on the host, recorded before it starts and undone at teardown:
sysctls (kubelet tunes several), iptables (kubelet adds its chains), mounts (containerd, the
kubelet and CSI volumes), network devices and namespaces (the CNI bridge), cgroups
(kubelet's `kubepods` hierarchy)."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .layout import BRIDGE, Layout

SYSCTLS = (
    # kubelet's kernel tunables (setupKernelTunables)
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    # the CNI bridge plugin turns forwarding on for its gateway
    "net/ipv4/ip_forward",
    "net/ipv6/conf/all/forwarding",
    # kube-proxy (iptables mode)
    "net/ipv4/conf/all/route_localnet",
    "net/bridge/bridge-nf-call-iptables",
    "net/netfilter/nf_conntrack_max",
    "net/netfilter/nf_conntrack_tcp_timeout_established",
    "net/netfilter/nf_conntrack_tcp_timeout_close_wait",
)
CGROUP_ROOT = Path("/sys/fs/cgroup")
NETNS_DIR = Path("/run/netns")


@dataclass
class Snapshot:
    sysctls: dict[str, str] = field(default_factory=dict)
    iptables: dict[str, str] = field(default_factory=dict)
    mounts: list[str] = field(default_factory=list)
    netns: list[str] = field(default_factory=list)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.__dict__))

    @classmethod
    def load(cls, path: Path) -> Snapshot | None:
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None


COUNTERS = re.compile(r"\[\d+:\d+\]")
"""A chain's packet and byte counters in iptables-save's output."""


def take_snapshot() -> Snapshot:
    snap = Snapshot()
    for key in SYSCTLS:
        with contextlib.suppress(OSError):
            snap.sysctls[key] = (Path("/proc/sys") / key).read_text().strip()
    for tool in ("iptables", "ip6tables"):
        saved = _rules(tool)
        if saved is not None:
            snap.iptables[tool] = saved
    snap.mounts = mount_points()
    snap.netns = sorted(p.name for p in NETNS_DIR.iterdir()) if NETNS_DIR.is_dir() else []
    return snap


def restore(snap: Snapshot) -> list[str]:
    """Put the host back; returns what could not be undone (empty when clean)."""
    problems: list[str] = []
    for key, value in snap.sysctls.items():
        path = Path("/proc/sys") / key
        try:
            if path.read_text().strip() != value:
                path.write_text(value)
        except OSError as exc:
            problems.append(f"sysctl {key}: {exc}")
    for tool, saved in snap.iptables.items():
        now = _rules(tool)
        if now is None or now == saved:
            continue
        # iptables-restore replaces the tables it is given; tables that were empty before
        # are given empty, so kubelet's chains go too.
        had = {line for line in saved.splitlines() if line.startswith("*")}
        tables = [line for line in now.splitlines() if line.startswith("*")]
        emptied = "".join(f"{table}\nCOMMIT\n" for table in tables if table not in had)
        if _run([f"{tool}-restore"], saved + emptied) is None:
            problems.append(f"{tool}-restore failed")
    return problems


def mount_points() -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        points.append(line.split()[4].replace("\\040", " "))
    return points


def unmount_new(snap: Snapshot, layout: Layout) -> list[str]:
    """Unmount (deepest first) what appeared since the snapshot below the node's own dirs and
    the network namespaces dir; returns the mount points that stayed."""
    prefixes = [str(p) for p in (layout.kubelet_root, layout.state, layout.run, NETNS_DIR)]
    before = set(snap.mounts)

    def ours() -> list[str]:
        return sorted(
            {
                m
                for m in mount_points()
                if m not in before and any(m == p or m.startswith(p + "/") for p in prefixes)
            },
            key=lambda m: (-m.count("/"), m),
        )

    for _ in range(3):
        left = ours()
        if not left:
            return []
        for point in left:
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    return ours()


def remove_netns(snap: Snapshot) -> None:
    if not NETNS_DIR.is_dir():
        return
    for entry in NETNS_DIR.iterdir():
        if entry.name not in snap.netns:
            subprocess.run(["umount", "-l", str(entry)], capture_output=True, check=False)
            with contextlib.suppress(OSError):
                entry.unlink()
    if not snap.netns:
        with contextlib.suppress(OSError):
            NETNS_DIR.rmdir()


def remove_bridge() -> None:
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True, check=False)


def remove_cgroups() -> list[str]:
    """Remove kubelet's `kubepods` trees (deepest first) in every hierarchy."""
    left = []
    for hierarchy in CGROUP_ROOT.iterdir() if CGROUP_ROOT.is_dir() else ():
        top = hierarchy / "kubepods"
        if not top.is_dir():
            continue
        dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for d in [*dirs, top]:
            with contextlib.suppress(OSError):
                d.rmdir()
        if top.exists():
            left.append(str(top))
    return left


def leftovers(snap: Snapshot, layout: Layout) -> list[str]:
    """Everything the node would have left behind; empty after a clean teardown."""
    found = []
    prefixes = [str(p) for p in (layout.kubelet_root, layout.state, layout.run, NETNS_DIR)]
    found += [
        f"mount {m}"
        for m in mount_points()
        if m not in snap.mounts and any(m.startswith(p) for p in prefixes)
    ]
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        found.append(f"network device {BRIDGE}")
    if NETNS_DIR.is_dir():
        found += [f"netns {p.name}" for p in NETNS_DIR.iterdir() if p.name not in snap.netns]
    if CGROUP_ROOT.is_dir():
        found += [
            f"cgroup {h / 'kubepods'}" for h in CGROUP_ROOT.iterdir() if (h / "kubepods").exists()
        ]
    for tool, saved in snap.iptables.items():
        if _rules(tool) != saved:
            found.append(f"{tool} rules differ from before the node started")
    for key, value in snap.sysctls.items():
        with contextlib.suppress(OSError):
            now = (Path("/proc/sys") / key).read_text().strip()
            if now != value:
                found.append(f"sysctl {key}={now} (was {value})")
    return found


def _rules(tool: str) -> str | None:
    """`<tool>-save` without its comment lines (they carry the time of the dump) and with
    chain counters zeroed (traffic moves them: a table that existed before the node would
    otherwise never compare equal)."""
    saved = _run([f"{tool}-save"])
    if saved is None:
        return None
    return "".join(
        COUNTERS.sub("[0:0]", line) + "\n"
        for line in saved.splitlines()
        if not line.startswith("#")
    )


def _run(argv: list[str], stdin: str | None = None) -> str | None:
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout
