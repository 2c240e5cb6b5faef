"""`niphas up`: the embedded default in one command.

Starts NATS (embedded unless a URL is given: one server, or a JetStream cluster on loopback with
NIPHAS_NATS_CLUSTER_SIZE), provisions the streams, then runs every installed service as its own
process, restarting one that dies, until Ctrl-C or SIGTERM stops them all (services first, so
they drain, then NATS).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from niphas_common.bus.connection import connect
from niphas_common.bus.topology import ensure_streams
from niphas_common.nats_cluster import EmbeddedNatsCluster
from niphas_common.nats_server import URL_FILE, EmbeddedNats
from niphas_common.settings import NatsSettings

log = logging.getLogger(__name__)

RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
STOP_GRACE_S = 30.0


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = field(default=0.0)


async def provision(settings: NatsSettings) -> None:
    nc = await connect(settings, name="niphas-up")
    try:
        await ensure_streams(nc.jetstream(), settings)
    finally:
        await nc.drain()


def start_embedded(
    state_dir: Path, env: dict[str, str]
) -> tuple[EmbeddedNats | EmbeddedNatsCluster, str]:
    """The embedded NATS of NIPHAS_NATS_CLUSTER_SIZE servers and its URL; a cluster makes
    streams and buckets as many replicas, up to 3 (unless NIPHAS_NATS_REPLICAS is set)."""
    size = NatsSettings().cluster_size
    if size == 1:
        server = EmbeddedNats(state_dir / "nats")
        return server, server.start()
    cluster = EmbeddedNatsCluster(state_dir / "nats-cluster", size=size)
    cluster.start()
    env.setdefault("NIPHAS_NATS_REPLICAS", str(min(size, 3)))
    print(f"NATS cluster of {size} servers (store in {cluster.state_dir})", flush=True)
    return cluster, cluster.url


def supervise(children: list[Child], env: dict[str, str]) -> None:
    """Start children that are not running, restarting crashed ones with backoff."""
    now = time.monotonic()
    for child in children:
        if child.proc is not None and child.proc.poll() is not None:
            code = child.proc.returncode
            delay = RESTART_BACKOFF_S[min(child.restarts, len(RESTART_BACKOFF_S) - 1)]
            print(f"{child.name} exited with {code}; restarting in {delay:.0f}s", flush=True)
            child.proc, child.next_start = None, now + delay
            child.restarts += 1
        if child.proc is None and now >= child.next_start:
            child.proc = subprocess.Popen(child.argv, env=env)
            child.started_at = now
            print(f"started {child.name} (pid {child.proc.pid})", flush=True)
        # A child that stayed up a minute has recovered: reset its backoff.
        if child.proc is not None and now - child.started_at > 60:
            child.restarts = 0


def run_up(state_dir: Path, services: list[str], nats_url: str | None) -> int:
    stop = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    server: EmbeddedNats | EmbeddedNatsCluster | None = None
    url_file = state_dir / URL_FILE
    children: list[Child] = []
    env = {**os.environ, "NIPHAS_STATE_DIR": str(state_dir)}
    try:
        if nats_url is None:
            server, nats_url = start_embedded(state_dir, env)
            url_file.parent.mkdir(parents=True, exist_ok=True)
            url_file.write_text(nats_url + "\n")
        env["NATS_URL"] = nats_url
        settings = NatsSettings(url=nats_url)
        settings.replicas = int(env.get("NIPHAS_NATS_REPLICAS") or settings.replicas)
        asyncio.run(provision(settings))
        print(f"streams and buckets with {settings.replicas} replica(s)", flush=True)
        print(f"NATS JetStream at {nats_url}", flush=True)
        if not services:
            print("no services are installed; running NATS only", flush=True)
        children = [Child(name, [sys.executable, "-m", "niphas_common", name]) for name in services]
        while not stop:
            supervise(children, env)
            time.sleep(0.2)
    finally:
        print("stopping...", flush=True)
        running = [c.proc for c in children if c.proc is not None and c.proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in running:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if server is not None:
            server.stop()
            url_file.unlink(missing_ok=True)
        print("stopped", flush=True)
    return 0
