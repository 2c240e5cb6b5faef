"""The soak: the demo's stack on NATS we run ourselves (so we can restart it: one server, or a
cluster of `--nats-cluster N` with every stream and bucket replicated N times), pushes sent over
time while the fault driver kills services and NATS servers and the mount loop keeps moving the
workload's pod, then a wait for quiescence and the checks.

The stack is the demo's (`niphas_demo`: settings, sample repository, webhook, kubelet); each
push commits a new version of the sample page, so each push is a distinct commit whose
derivations differ. Settings changed from the demo's, each for a reason:
- `NIPHAS_BUILDER_SUPERSEDE=false`: every push must get its own build (a queued build of an
  overtaken commit would otherwise be answered `superseded`, by design);
- ack waits and the build lease at 20 s (defaults 30-60 s): a killed service's event comes
  back sooner, so a soak takes minutes, not tens of minutes. Correctness does not depend on them.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import nats.errors
from nats.js import JetStreamContext
from rich.console import Console

from niphas_chaos import leaks
from niphas_chaos.checks import (
    ConsumerState,
    Finding,
    builds_in_log,
    builds_per_push,
    dead_letters,
    stuck_consumers,
)
from niphas_chaos.faults import Fault, FaultDriver, Plan
from niphas_chaos.mounting import MountLoop, MountRecord, clear
from niphas_chaos.recovery import ErrorRate, Recovery, publish_errors, quiet_waits, recoveries
from niphas_common.bus.inspect import StoredMessage, consumers, streams, view
from niphas_common.nats_cluster import EmbeddedNatsCluster
from niphas_common.nats_server import EmbeddedNats
from niphas_common.nix.runner import NixRunner
from niphas_demo.flow import Demo, until
from niphas_demo.kubelet import Kubelet
from niphas_demo.webhook import send_push

SOAK_ENV = {
    "NIPHAS_BUILDER_SUPERSEDE": "false",
    "NIPHAS_BUILDER_ACK_WAIT_S": "20",
    "NIPHAS_BUILDER_LEASE_TTL_S": "20",
    "NIPHAS_EVAL_ACK_WAIT_S": "20",
}
WEBHOOK_RETRY_S = 180.0
"""How long a push is re-delivered (same delivery id) while the ingress is down."""
VERIFY_TIMEOUT_S = 1800.0
PIPELINE = ("push.received", "eval.done", "build.done")
PIPELINE_STREAMS = ("PUSH_RECEIVED", "EVAL_DONE", "BUILD_DONE")
"""Whose leaders a server kill aims at, besides the key-value buckets' streams (`KV_*`)."""
LEAK_SETTLE_S = 10.0
READ_RETRY_S = 60.0


@dataclass(frozen=True)
class Options:
    pushes: int
    kills: int
    nats_restarts: int
    push_interval_s: float
    seed: int
    quiesce_timeout_s: float
    verify_host_all: bool = False
    nats_cluster: int = 1
    """Servers: 1 is the single server; 3 a JetStream cluster (streams with 3 replicas)."""
    partitions: int = 0
    partition_s: float = 10.0
    mounts: bool = True
    """Publish and unpublish volumes throughout (else only the final workload check mounts)."""


@dataclass
class Push:
    version: str
    commit: str
    attempts: int


@dataclass
class Outcome:
    pushes: list[Push] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    events: dict[str, int] = field(default_factory=dict)
    builds_started: int = 0
    builds_pushed: int = 0
    findings: list[Finding] = field(default_factory=list)
    served: str = ""
    verified: dict[str, str] = field(default_factory=dict)
    """Store -> `clean` or nix's complaint."""
    quiesced_s: float = 0.0
    nats_servers: int = 1
    recoveries: list[Recovery] = field(default_factory=list)
    quiet_waits: list[float] = field(default_factory=list)
    """The same wait from quiet moments of the pushing phase: the recoveries' baseline."""
    pushing: tuple[float, float] = (0.0, 0.0)
    """The pushing phase, as Unix times."""
    mounts: MountRecord = field(default_factory=MountRecord)
    publish_errors: dict[str, ErrorRate] = field(default_factory=dict)
    """`during faults`, `during NATS faults`, `outside` -> failed and total publishes."""
    leaks: dict[str, int] = field(default_factory=dict)

    def count(self, kind: str) -> int:
        return sum(1 for f in self.findings if f.kind == kind)

    @property
    def failed(self) -> bool:
        return bool(self.findings)


class Soak:
    def __init__(self, state: Path, console: Console, options: Options) -> None:
        self.options = options
        self.console = console
        self.demo = Demo(state, console)
        self.rng = random.Random(options.seed)
        self.run_id = secrets.token_hex(3)
        self.nats: EmbeddedNats | EmbeddedNatsCluster = (
            EmbeddedNatsCluster(state / "nats-cluster", size=options.nats_cluster)
            if options.nats_cluster > 1
            else EmbeddedNats(state / "nats")
        )
        self.outcome = Outcome(nats_servers=options.nats_cluster)
        self._started = datetime.now(UTC)
        self._log_offset = 0
        self._outputs: dict[str, dict[str, str]] = {}
        self._closures: set[str] = set()

    @property
    def js(self) -> JetStreamContext:
        assert self.demo.nc is not None
        return self.demo.nc.jetstream()

    async def run(self) -> Outcome:
        try:
            await self._run()
        finally:
            await self.demo.close()
            await asyncio.to_thread(self.nats.stop)
        return self.outcome

    async def _run(self) -> None:
        options, console = self.options, self.console
        env = {**await asyncio.to_thread(self.demo.prepare), **SOAK_ENV}
        env["NIPHAS_NATS_REPLICAS"] = str(options.nats_cluster)
        await asyncio.to_thread(self.nats.start)
        url = self.nats.url
        log = self.demo.layout.demo / "niphas-up.log"
        self._log_offset = log.stat().st_size if log.exists() else 0
        await self.demo.start(env, url)
        assert self.demo.stack is not None
        console.print(f"stack up: NATS {url}, services {sorted(self.demo.stack.service_pids())}")
        duration = options.pushes * options.push_interval_s
        plan = Plan.random(
            self.rng, options.kills, options.nats_restarts, duration, options.partitions
        )
        faults_log = self.demo.layout.demo / "chaos-faults.log"
        driver = FaultDriver(
            plan, self.demo.stack.service_pids, self.nats, self.rng, faults_log,
            await self._leader_streams(), options.partition_s,
        )  # fmt: skip
        self.outcome.faults = driver.faults
        mounting = MountLoop(self.demo.layout, driver.t0)
        mounted = asyncio.create_task(mounting.run()) if options.mounts else None
        try:
            started = time.time()
            await asyncio.gather(self._push_all(), driver.run())
            self.outcome.pushing = (started, time.time())
            console.print(f"{len(self.outcome.pushes)} pushes sent, {len(driver.faults)} faults")
            t0 = time.monotonic()
            await self._quiesce()
            self.outcome.quiesced_s = time.monotonic() - t0
        finally:
            mounting.stop()  # its last pod unpublished, also when the soak failed
            record = await mounted if mounted is not None else None
        if record is not None:
            self._check_mounts(record)
        await self._check_pipeline()
        await self._check_workload()
        await self._check_leaks()
        await self._check_stores()

    async def _leader_streams(self) -> list[str]:
        """The pipeline's streams and the key-value buckets' (`KV_<bucket>`)."""
        names = [info.config.name or "" for info in await streams(self.js)]
        return [*PIPELINE_STREAMS, *(n for n in names if n.startswith("KV_"))]

    # -- load ---------------------------------------------------------------------------------

    async def _push_all(self) -> None:
        for i in range(self.options.pushes):
            started = time.monotonic()
            await self._push(f"c{self.run_id}-{i}")
            rest = self.options.push_interval_s - (time.monotonic() - started)
            await asyncio.sleep(max(0.0, self.rng.uniform(0.5, 1.5) * rest))

    async def _push(self, version: str) -> None:
        """One commit, its webhook delivered until the ingress accepts it."""
        repo = self.demo.repo
        assert repo is not None
        before, after = await asyncio.to_thread(repo.commit_version, version)
        url = f"http://127.0.0.1:{self.demo.ports.eval}/hooks/github"
        delivery, attempts = str(uuid.uuid4()), 0
        deadline = time.monotonic() + WEBHOOK_RETRY_S
        while True:
            attempts += 1
            try:
                status, answer = await send_push(
                    url, self.demo.secret, repo.url, before, after, delivery
                )
            except (aiohttp.ClientError, TimeoutError) as exc:
                status, answer = 0, {"error": repr(exc)}
            if 200 <= status < 300:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"push {version}: the ingress kept answering {status} {answer}")
            await asyncio.sleep(0.5)
        self.outcome.pushes.append(Push(version, after, attempts))

    # -- reading back -------------------------------------------------------------------------

    async def _stored(self, subject: str) -> list[StoredMessage]:
        """Every message on `subject`, read again while a cluster elects (503s)."""
        deadline = time.monotonic() + READ_RETRY_S
        while True:
            try:
                return await view(self.js, subject, last=1_000_000)
            except nats.errors.Error:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1.0)

    async def _bodies(self, subject: str) -> list[dict[str, Any]]:
        stored = await self._stored(subject)
        return [json.loads(m.data) for m in stored]

    async def _consumer_states(self) -> list[ConsumerState]:
        states = []
        for info in await streams(self.js):
            name = info.config.name or ""
            for consumer in await consumers(self.js, name):
                if consumer.config.durable_name:
                    states.append(
                        ConsumerState(
                            name,
                            consumer.config.durable_name,
                            consumer.num_pending or 0,
                            consumer.num_ack_pending or 0,
                        )
                    )
        return states

    async def _answered(self) -> bool:
        commits = [p.commit for p in self.outcome.pushes]
        evals, builds = await self._bodies("eval.done"), await self._bodies("build.done")
        for commit in commits:
            mine = [e for e in evals if e.get("commit") == commit]
            if not mine:
                return False
            drvs = {a.get("drv_path") for e in mine for a in e.get("attributes") or []}
            built = {b.get("drv_path") for b in builds if b.get("commit") == commit}
            if not drvs <= built:
                return False
        return True

    async def _quiesce(self) -> None:
        """Until every push was answered and every durable consumer is drained, twice in a
        row (or the timeout: what is missing then is reported by the checks)."""
        quiet = 0

        async def probe() -> bool | None:
            nonlocal quiet
            try:
                drained = not stuck_consumers(await self._consumer_states())
                done = drained and await self._answered()
            except (OSError, TimeoutError, LookupError, nats.errors.Error) as exc:
                # A cluster electing a leader answers 503 for a moment: read again.
                self.console.print(f"  (reading the bus: {exc!r})")
                done = False
            quiet = quiet + 1 if done else 0
            if quiet < 2:
                await asyncio.sleep(1.0)
                return None
            return True

        try:
            await until("quiescence", probe, timeout_s=self.options.quiesce_timeout_s)
        except TimeoutError as exc:
            self.console.print(f"[yellow]{exc}[/yellow]")

    # -- checks -------------------------------------------------------------------------------

    async def _check_pipeline(self) -> None:
        outcome = self.outcome
        commits = [p.commit for p in outcome.pushes]
        ours = set(commits)
        times: list[float] = []
        for subject in PIPELINE:
            stored = await self._stored(subject)
            bodies = [json.loads(m.data) for m in stored]
            outcome.events[subject] = sum(1 for b in bodies if b.get("commit") in ours)
            times += [m.time.timestamp() for m in stored if m.time is not None]
        outcome.recoveries = recoveries(outcome.faults, times)
        outcome.quiet_waits = quiet_waits(outcome.faults, times, *outcome.pushing)
        evals, builds = await self._bodies("eval.done"), await self._bodies("build.done")
        found, self._outputs = builds_per_push(commits, evals, builds)
        self._closures = {p for b in builds if b.get("commit") in ours for p in b["closure"]}
        outcome.findings += found
        log = self.demo.layout.demo / "niphas-up.log"
        with log.open(errors="replace") as text:
            text.seek(self._log_offset)
            found, started, pushed = builds_in_log(text)
        outcome.findings += found
        outcome.builds_started, outcome.builds_pushed = sum(started.values()), sum(pushed.values())
        outcome.findings += stuck_consumers(await self._consumer_states())
        letters = await self._stored("dead.>")
        recent = [m.subject for m in letters if m.time is None or m.time >= self._started]
        outcome.findings += dead_letters(recent)

    async def _check_workload(self) -> None:
        """The latest push's app answers through the kubelet path (CSI mount, mesh fetch)."""
        latest = self.outcome.pushes[-1]
        paths = list(self._outputs.get(latest.commit, {}).values())
        if not paths:
            return  # already a loss
        demo = self.demo
        try:
            spec = await demo.rendered(paths[0])
            async with Kubelet(demo.layout.csi_socket, demo.layout.pods) as kubelet:
                _, page = await demo.serve(kubelet, spec, latest.version)
        except (RuntimeError, TimeoutError, OSError) as exc:
            self.outcome.findings.append(Finding("loss", f"workload web: {exc}"))
            return
        self.outcome.served = page.strip()
        if latest.version not in page:
            self.outcome.findings.append(
                Finding("loss", f"workload web serves {page.strip()!r}, not {latest.version}")
            )

    async def _check_stores(self) -> None:
        node = str(self.demo.layout.node_store)
        host_args = ["--all"] if self.options.verify_host_all else sorted(self._closures)
        for name, runner, args in (
            ("node store (--all)", NixRunner(store=node, timeout=VERIFY_TIMEOUT_S), ["--all"]),
            (
                "host store (--all)" if self.options.verify_host_all else "host store (closures)",
                NixRunner(timeout=VERIFY_TIMEOUT_S),
                host_args,
            ),
        ):
            if not args:
                continue
            result = await asyncio.to_thread(
                runner.run, "nix", "store", "verify", "--no-trust", *args, check=False
            )
            if result.returncode == 0:
                self.outcome.verified[name] = "clean"
            else:
                complaint = result.stderr.strip().splitlines()
                self.outcome.verified[name] = complaint[-1] if complaint else "failed"
                self.outcome.findings.append(Finding("corrupt", f"{name}: {complaint[-3:]}"))

    def _check_mounts(self, record: MountRecord) -> None:
        """Every publish worked with its closure intact, or failed with a clear CSI error that
        a retry resolved."""
        self.outcome.mounts = record
        self.outcome.publish_errors = publish_errors(record.attempts, self.outcome.faults)
        self.outcome.findings += [Finding("mount", problem) for problem in record.problems]
        if not any(a.call == "publish" and not a.error for a in record.attempts):
            self.outcome.findings.append(Finding("mount", "no volume was ever published"))
        unclear = [a.error for a in record.attempts if a.error and not clear(a.error)]
        self.outcome.findings += [Finding("mount", f"unclear error: {e}") for e in unclear]

    async def _check_leaks(self) -> None:
        """Once every pod is gone: no mount, lease, view or volume record left (a short settle
        for the driver's last unpublish)."""
        layout = self.demo.layout
        deadline = time.monotonic() + LEAK_SETTLE_S
        counts = leaks.count(layout)
        while any(counts.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            counts = leaks.count(layout)
        self.outcome.leaks = counts
        self.outcome.findings += [
            Finding("leak", f"{n} {what} left") for what, n in counts.items() if n
        ]
