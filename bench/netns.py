"""A network of namespaces for the benchmarks: a hub namespace holding a bridge, and one
namespace per simulated host, each linked to the bridge by a veth pair whose two ends are rate
limited with a token bucket (`tc ... tbf`), so a host's upload and download each get the
link's rate, as a machine on a switch would.

No interface is created in the caller's namespace and there is no default route, so traffic
stays between the namespaces made here. Names carry this process's id (`nph<pid>-...`);
`Network.remove` deletes them all (the veths, the bridge and their qdiscs go with their
namespaces), and `remove_stale` deletes what a killed run left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

NETNS_DIR = Path("/run/netns")
PREFIX = "nph"
CLONE_NEWNET = 0x40000000
SUBNET = "10.213"
"""The /16 the namespaces are numbered in (the hub's bridge is .0.1)."""


class NetworkError(RuntimeError):
    """A namespace, link or qdisc could not be made (not root, no `ip`/`tc`, no module)."""


@dataclass(frozen=True)
class Host:
    name: str
    netns: str
    address: str


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise NetworkError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")


def _tbf(netns: str, dev: str, rate_bit: float) -> None:
    # The bucket holds ~4 ms of the rate (at least two full-size GSO segments' worth), so a
    # link never bursts far above its rate; `latency` bounds the queue.
    burst = max(64 << 10, int(rate_bit / 8 / 250))
    argv = ["ip", "netns", "exec", netns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
            "rate", f"{int(rate_bit)}bit", "burst", str(burst), "latency", "100ms"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise NetworkError(f"`{' '.join(argv[4:])}` in {netns} failed: {proc.stderr.strip()}")


class Network:
    """The hub (bridge at `<SUBNET>.0.1`) and the hosts added to it, each behind a link of
    `rate_bit` bits/s in both directions."""

    def __init__(self, rate_bit: float) -> None:
        if rate_bit <= 0:
            raise NetworkError(f"link rate must be positive, got {rate_bit} bit/s")
        self.rate_bit = rate_bit
        self.prefix = f"{PREFIX}{os.getpid()}"
        self.hub = Host("hub", f"{self.prefix}-hub", f"{SUBNET}.0.1")
        self.hosts: dict[str, Host] = {}
        self._made: list[str] = []

    def create(self) -> None:
        remove_stale()
        self._add_netns(self.hub.netns)
        # Traffic to a namespace's own addresses goes over its loopback.
        _ip("-n", self.hub.netns, "link", "set", "lo", "up")
        _ip("-n", self.hub.netns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub.netns, "addr", "add", f"{self.hub.address}/16", "dev", "br0")
        _ip("-n", self.hub.netns, "link", "set", "br0", "up")

    def add(self, name: str) -> Host:
        """A namespace `name` linked to the bridge: `eth0` inside, `p<index>` on the hub."""
        index = len(self.hosts) + 2
        if index > 65_000:
            raise NetworkError("more hosts than the /16 holds")
        host = Host(name, f"{self.prefix}-{name}", f"{SUBNET}.{index >> 8}.{index & 255}")
        port = f"p{index}"
        self._add_netns(host.netns)
        _ip("-n", host.netns, "link", "set", "lo", "up")
        _ip("-n", self.hub.netns, "link", "add", port, "type", "veth",
            "peer", "name", "eth0", "netns", host.netns)  # fmt: skip
        _ip("-n", self.hub.netns, "link", "set", port, "master", "br0", "up")
        _ip("-n", host.netns, "addr", "add", f"{host.address}/16", "dev", "eth0")
        _ip("-n", host.netns, "link", "set", "eth0", "up")
        _tbf(host.netns, "eth0", self.rate_bit)  # the host's upload
        _tbf(self.hub.netns, port, self.rate_bit)  # its download
        self.hosts[name] = host
        return host

    def sent(self, name: str) -> int:
        """Bytes host `name` has sent over its link (its upload qdisc's counter)."""
        argv = ["tc", "-j", "-s", "qdisc", "show", "dev", "eth0"]
        proc = subprocess.run(self.exec(name, argv), capture_output=True, text=True)
        if proc.returncode != 0:
            raise NetworkError(f"`{' '.join(argv)}` in {name} failed: {proc.stderr.strip()}")
        return sum(int(q.get("bytes", 0)) for q in json.loads(proc.stdout) if q.get("root"))

    def exec(self, name: str, argv: list[str]) -> list[str]:
        """`argv` run inside host `name`'s namespace (`hub` for the hub's)."""
        netns = self.hub.netns if name == "hub" else self.hosts[name].netns
        return ["ip", "netns", "exec", netns, *argv]

    @contextlib.contextmanager
    def entered(self, name: str = "hub") -> Iterator[None]:
        """The calling thread inside a namespace (its sockets and the processes it starts),
        back in its own on exit."""
        netns = self.hub.netns if name == "hub" else self.hosts[name].netns
        with open("/proc/thread-self/ns/net") as own, open(NETNS_DIR / netns) as target:
            _setns(target.fileno())
            try:
                yield
            finally:
                _setns(own.fileno())

    def remove(self) -> None:
        """Delete every namespace made here (their processes must have exited; the kernel
        frees a namespace when its last process leaves)."""
        for netns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        self._made.clear()
        self.hosts.clear()

    def _add_netns(self, netns: str) -> None:
        _ip("netns", "add", netns)
        self._made.append(netns)


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise NetworkError(f"setns failed: {os.strerror(errno)}")


def remove_stale() -> None:
    """Delete namespaces of earlier runs whose process is gone (killed before its cleanup)."""
    if not NETNS_DIR.is_dir():
        return
    for entry in NETNS_DIR.iterdir():
        pid = entry.name.removeprefix(PREFIX).split("-", 1)[0]
        if entry.name.startswith(PREFIX) and pid.isdigit() and not Path(f"/proc/{pid}").exists():
            subprocess.run(["ip", "netns", "del", entry.name], capture_output=True)
