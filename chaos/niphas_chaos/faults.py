"""The fault driver: at random moments, SIGKILL a random service (the process `niphas up`
started and everything it started, as a container dies whole) and, once, restart the NATS
server on the same port with its file storage intact. `niphas up` restarts what was killed;
the services reconnect to NATS on their own."""

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

from niphas_common.nats_server import EmbeddedNats
from niphas_demo.stack import child_pids

NATS_DOWN_S = 2.0
"""How long NATS stays down during its restart: long enough for every client to notice."""


@dataclass(frozen=True)
class Fault:
    at_s: float
    """Seconds since the soak started."""
    kind: str
    """`kill` or `nats restart`."""
    target: str
    pids: tuple[int, ...] = ()


@dataclass
class Plan:
    """When faults happen: `kills` SIGKILLs spread at random over `duration_s`, and the NATS
    restarts at random moments in its middle half."""

    kills: list[float]
    nats_restarts: list[float]

    @classmethod
    def random(cls, rng: random.Random, kills: int, nats_restarts: int, duration_s: float) -> Plan:
        return cls(
            sorted(rng.uniform(0, duration_s) for _ in range(kills)),
            sorted(rng.uniform(duration_s / 4, duration_s * 3 / 4) for _ in range(nats_restarts)),
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
    nats: EmbeddedNats
    rng: random.Random
    log: Path
    faults: list[Fault] = field(default_factory=list)
    _t0: float = field(default_factory=time.monotonic)

    async def run(self) -> None:
        events = [(t, "kill") for t in self.plan.kills]
        events += [(t, "nats restart") for t in self.plan.nats_restarts]
        for at_s, kind in sorted(events):
            await asyncio.sleep(max(0.0, at_s - (time.monotonic() - self._t0)))
            if kind == "kill":
                await self.kill_one()
            else:
                await self.restart_nats()

    async def kill_one(self) -> None:
        running = self.services()
        if not running:  # all being restarted right now: try again shortly
            await asyncio.sleep(1.0)
            running = self.services()
        if not running:
            self._record(Fault(self._now(), "kill", "(no service running)"))
            return
        name = self.rng.choice(sorted(running))
        self._record(Fault(self._now(), "kill", name, kill_tree(running[name])))

    async def restart_nats(self) -> None:
        await asyncio.to_thread(self.nats.stop)
        self._record(Fault(self._now(), "nats restart", self.nats.url))
        await asyncio.sleep(NATS_DOWN_S)
        await asyncio.to_thread(self.nats.start)

    def _now(self) -> float:
        return time.monotonic() - self._t0

    def _record(self, fault: Fault) -> None:
        self.faults.append(fault)
        with self.log.open("a") as out:
            pids = " ".join(map(str, fault.pids))
            out.write(f"+{fault.at_s:.1f}s {fault.kind} {fault.target} {pids}\n")
