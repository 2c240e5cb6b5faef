"""A JetStream cluster on loopback: `size` embedded nats-server processes with routes between
them, each with its own JetStream store, for tests, the demo and the chaos soak.

Every server gets its route (cluster) port up front, so each can list all routes from its first
start (JetStream clustering requires configured routes); client and monitoring ports are chosen
by the servers on first start and kept across restarts, so a client's server list stays valid.

`partition(i)` cuts server i off from the other servers' routes with iptables rules in a chain
of its own (`NIPHAS-NATS-<route port>`): connections to or from its route port are reset, and so
are the route connections it opens itself, matched by the cgroup v2 directory it runs in (every
server starts inside one). Clients still reach it. Leaving the block removes the chain.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from niphas_common.nats_server import EmbeddedNats, NatsServerError, find_nats_server

log = logging.getLogger(__name__)

CLUSTER_NAME = "niphas"
IPTABLES = Path("/usr/sbin/iptables")
BUILTIN_CHAINS = (":INPUT ", ":FORWARD ", ":OUTPUT ")
"""The filter table's own chains: a table with these alone and no rule holds nothing."""
START_ATTEMPTS = 3
"""A route port picked free can be taken before its server binds it: retry with new ones."""


class NatsClusterError(NatsServerError):
    """The cluster could not be formed, queried or partitioned."""


def server_name(i: int) -> str:
    return f"{CLUSTER_NAME}-{i}"


def cgroup2_root() -> Path | None:
    """Where the cgroup v2 hierarchy is mounted, if it is and we may create groups in it."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in mounts:
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2":
            root = Path(fields[1].replace("\\040", " "))
            return root if os.access(root, os.W_OK) else None
    return None


def free_ports(host: str, count: int) -> list[int]:
    """`count` distinct ports free right now (held together while picked, so all differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def get_json(url: str, timeout_s: float = 1.0) -> dict[str, Any] | None:
    """A monitoring endpoint's answer; None when the server does not answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            answer: dict[str, Any] = json.load(response)
            return answer
    except (OSError, urllib.error.URLError, json.JSONDecodeError):
        return None


def majority(names: list[str], size: int) -> str | None:
    """The name more than half of `size` views agree on (an empty name is no leader)."""
    counts = Counter(n for n in names if n)
    if not counts:
        return None
    name, votes = counts.most_common(1)[0]
    return name if votes > size // 2 else None


class EmbeddedNatsCluster:
    """`size` nats-servers with JetStream, routed to each other on loopback, owned by this
    process. Streams and buckets on it take `NatsSettings.replicas` up to `size`."""

    def __init__(
        self,
        state_dir: Path,
        *,
        size: int = 3,
        host: str = "127.0.0.1",
        binary: Path | None = None,
        ready_timeout_s: float = 20.0,
    ) -> None:
        if size < 1:
            raise ValueError(f"a NATS cluster needs at least one server, not {size}")
        self.state_dir = state_dir
        self.size = size
        self.host = host
        self.binary = binary or find_nats_server()
        self.ready_timeout_s = ready_timeout_s
        self.servers: list[EmbeddedNats] = []
        self.route_ports: list[int] = []
        self._partitions: set[str] = set()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start every server; return once each is routed to all others and they agree on
        a JetStream meta leader."""
        for attempt in range(1, START_ATTEMPTS + 1):
            if not self.servers:
                self._plan()
            try:
                for server in self.servers:
                    server.start()
                break
            except NatsServerError:
                self.stop()
                if attempt == START_ATTEMPTS or self._started_once():
                    raise
                log.warning("a NATS cluster server did not start; retrying with new ports")
                self.servers = []
        self._wait(self._formed, "every server routed to the others and a meta leader")
        log.info("NATS cluster of %d ready at %s", self.size, self.url)

    def stop(self) -> None:
        """Stop every server (SIGTERM, so JetStream flushes) and heal any partition."""
        for chain in list(self._partitions):
            self._remove_chain(chain)
        for server in self.servers:
            server.stop()
            if server.cgroup is not None:
                with contextlib.suppress(OSError):
                    server.cgroup.rmdir()

    def __enter__(self) -> EmbeddedNatsCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def kill(self, i: int) -> None:
        """SIGKILL server i (its store stays, as after a crash)."""
        self.servers[i].kill()

    def restart(self, i: int) -> None:
        """Start server i again on the same ports and store; return once it is routed to every
        running server and, when a majority runs, knows the meta leader."""
        server = self.servers[i]
        server.stop()
        server.start()
        self._wait(lambda: self._rejoined(i), f"{server_name(i)} back in the cluster")

    # -- addresses -------------------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        """Client URLs, one per server (fixed once the cluster has started)."""
        return [server.url for server in self.servers]

    @property
    def url(self) -> str:
        """Every server, comma-separated: what NIPHAS_NATS_URL takes."""
        return ",".join(self.urls)

    # -- leaders ---------------------------------------------------------------------------

    def meta_leader(self) -> int | None:
        """The server a majority of the cluster names as JetStream meta leader."""
        names = []
        for server in self._running():
            jsz = get_json(f"{server.monitor_url}/jsz")
            names.append(((jsz or {}).get("meta_cluster") or {}).get("leader", ""))
        return self._index(majority(names, self.size))

    def stream_leader(self, stream: str) -> int | None:
        """The server leading `stream`, as named by a majority of the servers holding it."""
        names = []
        for server in self._running():
            jsz = get_json(f"{server.monitor_url}/jsz?accounts=true&streams=true")
            for account in (jsz or {}).get("account_details") or []:
                for detail in account.get("stream_detail") or []:
                    if detail.get("name") == stream:
                        names.append((detail.get("cluster") or {}).get("leader", ""))
        return self._index(majority(names, len(names)))

    # -- partition -------------------------------------------------------------------------

    @contextlib.contextmanager
    def partition(self, i: int) -> Iterator[None]:
        """Cut server i off from the other servers' routes (clients may still reach it);
        heal on exit. Needs root, iptables and a cgroup v2 hierarchy."""
        server = self.servers[i]
        if server.cgroup is None:
            raise NatsClusterError(
                "cannot partition a NATS server without a writable cgroup v2 hierarchy "
                "(the firewall matches its own route connections by cgroup)"
            )
        if not os.access(IPTABLES, os.X_OK):
            raise NatsClusterError(f"cannot partition a NATS server: no {IPTABLES}")
        own = self.route_ports[i]
        others = ",".join(str(p) for j, p in enumerate(self.route_ports) if j != i)
        chain = f"NIPHAS-NATS-{own}"
        reset = ["-j", "REJECT", "--reject-with", "tcp-reset"]
        cgroup_path = server.cgroup.name
        had_filter = self._filter_table_exists()  # before any iptables call can make it
        self._remove_chain(chain)  # a chain left by a process that died inside the block
        self._partitions.add(chain)
        try:
            self._iptables("-N", chain)
            self._iptables("-I", "OUTPUT", "-o", "lo", "-j", chain)
            # The resets REJECT sends back travel the same ports: let them through, or the
            # connections would only die of missed pings, minutes later.
            self._iptables("-A", chain, "-p", "tcp", "--tcp-flags", "RST", "RST", "-j", "RETURN")
            self._iptables("-A", chain, "-p", "tcp", "--dport", str(own), *reset)
            self._iptables("-A", chain, "-p", "tcp", "--sport", str(own), *reset)
            if others:
                self._iptables(
                    "-A", chain, "-p", "tcp", "-m", "cgroup", "--path", cgroup_path,
                    "-m", "multiport", "--dports", others, *reset,
                )  # fmt: skip
            log.info("NATS server %s partitioned from the cluster", server_name(i))
            yield
        finally:
            self._remove_chain(chain)
            if not had_filter:
                self._drop_empty_filter_table()
            log.info("NATS server %s partition healed", server_name(i))

    # -- internals -------------------------------------------------------------------------

    def _plan(self) -> None:
        """Route ports for every server and the servers themselves, each in its cgroup."""
        self.route_ports = free_ports(self.host, self.size)
        routes = ",".join(f"nats://{self.host}:{port}" for port in self.route_ports)
        cgroups = cgroup2_root()
        self.servers = []
        for i, port in enumerate(self.route_ports):
            cluster = (
                "--server_name", server_name(i),
                "--cluster_name", CLUSTER_NAME,
                "--cluster", f"nats://{self.host}:{port}",
                "--routes", routes,
            )  # fmt: skip
            self.servers.append(
                EmbeddedNats(
                    self.state_dir / server_name(i),
                    host=self.host,
                    binary=self.binary,
                    ready_timeout_s=self.ready_timeout_s,
                    monitoring=True,
                    cgroup=cgroups / f"niphas-nats-{port}" if cgroups else None,
                    extra_args=cluster,
                )
            )

    def _started_once(self) -> bool:
        return any(server.port is not None for server in self.servers)

    def _running(self) -> list[EmbeddedNats]:
        return [server for server in self.servers if server.running]

    def _index(self, name: str | None) -> int | None:
        """The server named `name`, if it runs (the others name a killed leader until their
        election timeout)."""
        for i in range(self.size):
            if name == server_name(i) and self.servers[i].running:
                return i
        return None

    def _routed_to(self, i: int) -> set[str]:
        routez = get_json(f"{self.servers[i].monitor_url}/routez") or {}
        return {r.get("remote_name", "") for r in routez.get("routes") or []}

    def _meta_leader_of(self, i: int) -> str:
        jsz = get_json(f"{self.servers[i].monitor_url}/jsz") or {}
        leader: str = (jsz.get("meta_cluster") or {}).get("leader", "")
        return leader

    def _formed(self) -> bool:
        everyone = {server_name(i) for i in range(self.size)}
        for i in range(self.size):
            if self._routed_to(i) != everyone - {server_name(i)}:
                return False
        leaders = {self._meta_leader_of(i) for i in range(self.size)}
        return len(leaders) == 1 and "" not in leaders

    def _rejoined(self, i: int) -> bool:
        running = {server_name(j) for j, s in enumerate(self.servers) if s.running and j != i}
        if not running <= self._routed_to(i):
            return False
        return len(running) + 1 <= self.size // 2 or bool(self._meta_leader_of(i))

    def _wait(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while not condition():
            for i, server in enumerate(self.servers):
                if server.port is not None and not server.running and server.pid is not None:
                    raise NatsClusterError(f"{server_name(i)} exited; see {server.state_dir}")
            if time.monotonic() > deadline:
                logs = ", ".join(str(s.state_dir / "nats-server.log") for s in self.servers)
                raise NatsClusterError(
                    f"NATS cluster: no {what} after {self.ready_timeout_s:g}s; see {logs}"
                )
            time.sleep(0.05)

    def _iptables(self, *args: str) -> None:
        result = subprocess.run([str(IPTABLES), *args], capture_output=True, text=True)
        if result.returncode != 0:
            raise NatsClusterError(
                f"$ iptables {' '.join(args)} failed: {result.stderr.strip() or result.returncode}"
            )

    @staticmethod
    def _filter_table() -> list[str] | None:
        """The filter table's lines, None when it does not exist (`iptables-save -t filter`
        would print an empty one either way)."""
        saved = subprocess.run([f"{IPTABLES}-save"], capture_output=True, text=True).stdout
        lines = saved.splitlines()
        if "*filter" not in lines:
            return None
        start = lines.index("*filter")
        return lines[start : lines.index("COMMIT", start)]

    def _filter_table_exists(self) -> bool:
        return self._filter_table() is not None

    def _drop_empty_filter_table(self) -> None:
        """Remove the filter table our first rule created (iptables-nft makes a table on
        first use and keeps it), unless someone else has put rules in it meanwhile: the host
        is left as it was."""
        table = self._filter_table()
        if table is None or any(
            line.startswith(("-A", ":")) and not line.startswith(BUILTIN_CHAINS) for line in table
        ):
            return
        subprocess.run(
            [f"{IPTABLES}-restore"], input="*filter\nCOMMIT\n", capture_output=True, text=True
        )

    def _remove_chain(self, chain: str) -> None:
        """Unhook, flush and delete `chain`; whatever of it exists (safe to repeat)."""
        unhook = [str(IPTABLES), "-D", "OUTPUT", "-o", "lo", "-j", chain]
        while subprocess.run(unhook, capture_output=True).returncode == 0:
            pass
        for action in ("-F", "-X"):
            subprocess.run([str(IPTABLES), action, chain], capture_output=True)
        self._partitions.discard(chain)
