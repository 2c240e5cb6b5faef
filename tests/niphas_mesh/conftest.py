"""Fixtures for the mesh tests: simulated nodes (chroot stores under the test's tmp dir), each
with an in-process mesh agent on a loopback port, all on the test's real nats-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from niphas_common.nix.runner import NixRunner
from niphas_common.nix.store_path import StorePath
from niphas_common.settings import NatsSettings
from niphas_mesh.agent import Agent, start_agent
from niphas_mesh.settings import MeshSettings
from tests.nix_harness import CacheKey, FileCache

StartNode = Callable[..., Coroutine[Any, Any, Agent]]


def seed(root: Path, cache: FileCache, key: CacheKey, paths: list[StorePath]) -> None:
    """Put `paths` (with the cache's signatures) into the chroot store at `root`."""
    runner = NixRunner(store=str(root), options={"trusted-public-keys": str(key.public)})
    runner.copy(paths, src=cache.url, to=str(root))


@pytest.fixture
async def start_node(
    tmp_path: Path, nats_settings: NatsSettings, cache_key: CacheKey
) -> AsyncIterator[StartNode]:
    """Factory: `await start_node("n1", **settings)` -> a running Agent over its own store."""
    running: list[tuple[Agent, asyncio.Event, asyncio.Task[None]]] = []

    async def start(name: str, **overrides: Any) -> Agent:
        root = tmp_path / "nodes" / name
        root.mkdir(parents=True, exist_ok=True)
        fields: dict[str, Any] = {
            "node": name,
            "listen": "127.0.0.1:0",
            "store_root": str(root),
            "state_dir": tmp_path / "state",
            "trusted_public_keys": str(cache_key.public),
            "stall_timeout_s": 3.0,
            "peer_wait_s": 10.0,
            "gc_high_percent": 100.0,
            "gc_interval_s": 3600.0,
            "rescan_interval_s": 3600.0,
            **overrides,
        }
        agent = await start_agent(MeshSettings(**fields), nats_settings)
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        running.append((agent, stop, task))
        return agent

    yield start
    for _, stop, _ in running:
        stop.set()
    for agent, _, task in running:
        try:
            await asyncio.wait_for(task, 30)
        finally:
            await agent.close()


async def ready(agent: Agent) -> None:
    from tests.helpers import eventually

    async def check() -> str | None:
        return await agent.readiness()

    reason: list[str | None] = ["starting"]

    async def poll() -> None:
        while True:
            reason[0] = await check()
            if reason[0] is None:
                return
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), 30)
    await eventually(lambda: reason[0] is None)
