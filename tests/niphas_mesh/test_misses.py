"""Requests for paths the node's catalogue lacks: clients probe nodes for paths they do not
hold all the time, so a miss must not list the store directory each time (a host store has
tens of thousands of entries); a path that appears in the store outside the agent is still
served once a fresh listing shows it."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
import pytest

from niphas_mesh import store as store_module
from tests.niphas_mesh.conftest import StartNode, ready, seed
from tests.nix_harness import BuiltClosure, CacheKey, FileCache

pytestmark = [pytest.mark.nix, pytest.mark.root]


async def test_misses_share_one_listing_of_the_store(
    start_node: StartNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = await start_node("n1")
    await ready(agent)
    listed: list[str] = []
    real_listdir = os.listdir

    def counting(path: str | os.PathLike[str]) -> list[str]:
        if Path(path) == agent.store.real_store:
            listed.append(str(path))
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", counting)
    monkeypatch.setattr(store_module, "LISTING_MAX_AGE_S", 3600.0)
    missing = [f"{i:032d}" for i in range(60)]
    async with aiohttp.ClientSession() as http:

        async def get(hash_part: str) -> int:
            async with http.get(f"{agent.url}/{hash_part}.narinfo") as resp:
                return resp.status

        assert await asyncio.gather(*(get(h) for h in missing[:30])) == [404] * 30
        assert [await get(h) for h in missing[30:]] == [404] * 30
    assert len(listed) == 1


async def test_a_path_added_outside_the_agent_is_served(
    start_node: StartNode,
    built_closure: BuiltClosure,
    signed_cache: FileCache,
    cache_key: CacheKey,
    tmp_path: Path,
) -> None:
    agent = await start_node("n1")
    await ready(agent)
    app = built_closure.app
    url = f"{agent.url}/{app.hash_part}.narinfo"
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as resp:
            assert resp.status == 404
        # Copied in by another process: the catalogue has not seen it (no rescan).
        seed(tmp_path / "nodes" / "n1", signed_cache, cache_key, [app])
        assert agent.store.lookup(app.hash_part) is None

        async def served() -> str:
            while True:  # a fresh listing shows it within LISTING_MAX_AGE_S
                async with http.get(url) as resp:
                    if resp.status == 200:
                        return await resp.text()
                await asyncio.sleep(0.1)

        assert f"StorePath: {app}" in await asyncio.wait_for(served(), 30)
