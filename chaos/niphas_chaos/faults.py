"""The fault driver: at random moments, SIGKILL a random service (the process `niphas up`
started and everything it started, as a container dies whole) and disturb NATS.

On one server, NATS restarts on the same port with its file storage intact. On a cluster
(`EmbeddedNatsCluster`), one server at a time is SIGKILLed and restarted (preferably the leader
of a stream the pipeline uses, so a leader election happens under load), and one server is cut
from the others' routes for a while (`partition`). Faults never overlap on NATS: one server
down at a time keeps the cluster's quorum, which is what a rolling failure looks like.
`niphas up` restarts what was killed; the services reconnect to NATS on their own.

Every fault records when it ended (the service back, the server back in the cluster, the
partition healed), so the report can tell the mounts made during a fault from the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from niphas_common.nats_cluster import EmbeddedNatsCluster
from niphas_common.nats_server import EmbeddedNats
from niphas_demo.stack import child_pids

NATS_DOWN_S = 2.0
"""How long a NATS server stays down: long enough for every client to notice."""
SERVICE_BACK_TIMEOUT_S = 60.0
"""How long a killed service's restart is watched for (its fault's end)."""
NATS_FAULTS = ("nats restart", "nats kill", "partition")

LEADER_WAIT_S = 10.0
"""How long a server kill waits for a stream to have a leader to aim at."""


@dataclass
class Fault:
    at_s: float
    """Seconds since the soak started."""
    kind: str
    """`kill` (a service), `nats restart` (the one server), `nats kill` (one server of the
    cluster, killed and restarted) or `partition` (one server cut from the others)."""
    target: str
    pids: tuple[int, ...] = ()
    at_wall: float = 0.0
    """The same moment as a Unix time, to compare with JetStream's timestamps."""
    ended_s: float | None = None
    """When it was over (seconds since the soak started); None: not seen ending."""


@dataclass
class Plan:
    """When faults happen: `kills` SIGKILLs spread at random over `duration_s`, the NATS
    restarts (or server kills, on a cluster) and partitions at random moments in its middle
    half."""

    kills: list[float]
    nats_restarts: list[float]
    partitions: list[float] = field(default_factory=list)

    @classmethod
    def random(
        cls,
        rng: random.Random,
        kills: int,
        nats_restarts: int,
        duration_s: float,
        partitions: int = 0,
    ) -> Plan:
        def middle(n: int) -> list[float]:
            return sorted(rng.uniform(duration_s / 4, duration_s * 3 / 4) for _ in range(n))

        return cls(
            sorted(rng.uniform(0, duration_s) for _ in range(kills)),
            middle(nats_restarts),
            middle(partitions),
        )


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it, parents first."""
    out, queue = [], [pid]
    while queue:
        current = queue.pop(0)
        out.append(current)
        queue.extend(child_pids(current))
    return out


def kill_tree(pid: int) -> tuple[int, ...]:
    """SIGKILL `pid` and its descendants (stopped first so none forks meanwhile)."""
    pids = descendants(pid)
    for each in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(each, signal.SIGSTOP)
    for each in descendants(pid):  # children forked before the stop
        if each not in pids:
            pids.append(each)
    for each in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(each, signal.SIGKILL)
    return tuple(pids)


@dataclass
class FaultDriver:
    plan: Plan
    services: Callable[[], dict[str, int]]
    """The running services, name -> pid (`Stack.service_pids`)."""
    nats: EmbeddedNats | EmbeddedNatsCluster
    rng: random.Random
    log: Path
    leader_streams: list[str] = field(default_factory=list)
    """The streams whose leaders a server kill aims at (the pipeline's, the buckets')."""
    partition_s: float = 10.0
    faults: list[Fault] = field(default_factory=list)
    t0: float = field(default_factory=time.monotonic)
    """The soak's start (monotonic): every `at_s` counts from it."""
    _watchers: set[asyncio.Task[None]] = field(default_factory=set)

    async def run(self) -> None:
        nats_fault = "nats kill" if isinstance(self.nats, EmbeddedNatsCluster) else "nats restart"
        events = [(t, "kill") for t in self.plan.kills]
        events += [(t, nats_fault) for t in self.plan.nats_restarts]
        events += [(t, "partition") for t in self.plan.partitions]
        actions = {
            "kill": self.kill_one,
            "nats restart": self.restart_nats,
            "nats kill": self.kill_server,
            "partition": self.partition,
        }
        for at_s, kind in sorted(events):
            await asyncio.sleep(max(0.0, at_s - self._now()))
            await actions[kind]()
        if self._watchers:
            await asyncio.gather(*self._watchers)

    async def kill_one(self) -> None:
        running = self.services()
        if not running:  # all being restarted right now: try again shortly
            await asyncio.sleep(1.0)
            running = self.services()
        if not running:
            self._record(self._fault("kill", "(no service running)"))
            return
        name = self.rng.choice(sorted(running))
        fault = self._fault("kill", name)
        fault.pids = kill_tree(running[name])
        self._record(fault)
        watcher = asyncio.create_task(self._watch_back(fault, name, running[name]))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    async def _watch_back(self, fault: Fault, name: str, old_pid: int) -> None:
        deadline = self._now() + SERVICE_BACK_TIMEOUT_S
        while self._now() < deadline:
            pid = self.services().get(name)
            if pid is not None and pid != old_pid:
                fault.ended_s = self._now()
                return
            await asyncio.sleep(0.2)

    async def restart_nats(self) -> None:
        assert isinstance(self.nats, EmbeddedNats)
        await asyncio.to_thread(self.nats.stop)
        fault = self._fault("nats restart", self.nats.url)
        self._record(fault)
        await asyncio.sleep(NATS_DOWN_S)
        await asyncio.to_thread(self.nats.start)
        fault.ended_s = self._now()

    async def kill_server(self) -> None:
        """SIGKILL the leader of a stream the pipeline uses, then restart it."""
        cluster = self.nats
        assert isinstance(cluster, EmbeddedNatsCluster)
        server, why = await self._victim()
        fault = self._fault("nats kill", f"server {server} ({why})")
        await asyncio.to_thread(cluster.kill, server)
        self._record(fault)
        await asyncio.sleep(NATS_DOWN_S)
        await asyncio.to_thread(cluster.restart, server)
        fault.ended_s = self._now()

    async def _victim(self) -> tuple[int, str]:
        """The leader of one of `leader_streams` (picked at random); while none has a leader
        (an election after the previous fault), asked again for `LEADER_WAIT_S`; then the
        meta leader."""
        cluster = self.nats
        assert isinstance(cluster, EmbeddedNatsCluster)
        deadline = self._now() + LEADER_WAIT_S
        while True:
            for stream in self.rng.sample(self.leader_streams, len(self.leader_streams)):
                leader = await asyncio.to_thread(cluster.stream_leader, stream)
                if leader is not None:
                    return leader, f"leader of {stream}"
            if self._now() > deadline:
                break
            await asyncio.sleep(0.5)
        leader = await asyncio.to_thread(cluster.meta_leader)
        if leader is not None:
            return leader, "meta leader"
        return self.rng.randrange(len(cluster.servers)), "no leader known"

    async def partition(self) -> None:
        """Cut one server (not the meta leader when it can, so both sides matter: the
        majority elects, the cut one must catch up) from the others, then heal."""
        cluster = self.nats
        assert isinstance(cluster, EmbeddedNatsCluster)
        meta = await asyncio.to_thread(cluster.meta_leader)
        choices = [i for i in range(len(cluster.servers)) if i != meta] or [0]
        server = self.rng.choice(choices)
        fault = self._fault("partition", f"server {server} for {self.partition_s:.0f}s")
        with cluster.partition(server):
            self._record(fault)
            await asyncio.sleep(self.partition_s)
        fault.ended_s = self._now()

    def _now(self) -> float:
        return time.monotonic() - self.t0

    def _fault(self, kind: str, target: str) -> Fault:
        return Fault(self._now(), kind, target, at_wall=time.time())

    def _record(self, fault: Fault) -> None:
        self.faults.append(fault)
        with self.log.open("a") as out:
            pids = " ".join(map(str, fault.pids))
            out.write(f"+{fault.at_s:.1f}s {fault.kind} {fault.target} {pids}\n")
