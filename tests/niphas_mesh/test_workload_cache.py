"""A want naming the workload's own binary cache (`PathWanted.binary_cache`), on real nodes
(chroot stores, a real nats-server, real nix, real HTTP caches signed by `nix copy`): a path
only that cache holds is fetched when the want names it and the node allows it, and not
otherwise; a cache the node does not allow, or a public key it does not trust, fails the want
at once with the reason and that cache is never asked anything; an allowed cache serving paths
signed by a key the node does not trust is refused and nothing is imported."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from niphas_common.bus.bus import Bus
from niphas_common.bus.codec import decode
from niphas_common.nix.runner import NixRunner
from niphas_common.nix.signing import SecretKey
from niphas_common.nix.store_path import StorePath
from niphas_mesh.agent import Agent
from niphas_schemas import HOLDERS_BUCKET, PathAvailable
from niphas_schemas.holders import path_key
from tests.helpers import eventually
from tests.niphas_mesh.conftest import StartNode, ready
from tests.niphas_mesh.servers import counting_cache
from tests.niphas_mesh.test_fetch import has_closure, rejected, verify_store, want
from tests.nix_harness import BuiltClosure, FileCache

pytestmark = [pytest.mark.nix, pytest.mark.root, pytest.mark.slow]


async def failure(bus: Bus, node: Agent, path: StorePath) -> str | None:
    """The error of `node`'s `failed` word about `path`; None while it has said none."""
    entry = await (await bus.state(HOLDERS_BUCKET)).get(path_key(str(path), "node", node.node, ""))
    if entry is None or entry.value is None:
        return None
    said = decode(PathAvailable, entry.value)
    return said.error if said.state == "failed" else None


async def failed_with(bus: Bus, node: Agent, path: StorePath, within_s: float = 30) -> str:
    """Wait for `node`'s `failed` word about `path` (a readiness wait); its error."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while (error := await failure(bus, node, path)) is None:
        if loop.time() > deadline:
            raise AssertionError(f"{node.node} said no failure about {path} within {within_s}s")
        await asyncio.sleep(0.05)
    return error


def nothing_of(node: Agent, closure: BuiltClosure) -> bool:
    return not any(p in node.store for p in closure.paths)


async def test_a_path_only_in_an_allowed_workload_cache_comes_when_the_want_names_it(
    bus: Bus,
    start_node: StartNode,
    built_closure: BuiltClosure,
    make_file_cache: Callable[..., FileCache],
) -> None:
    own = make_file_cache(built_closure.paths, "none")  # signed by the key the nodes trust
    async with counting_cache(own.dir) as (url, served):
        node = await start_node("n1", workload_caches=f"https://elsewhere.example/ {url}/")
        await ready(node)
        # Without the cache in the want, no holder has the closure: the want fails.
        await want(bus, "n1", built_closure, within_s=2, who="plain")
        assert "plain: " in await failed_with(bus, node, built_closure.app)
        assert served.requests == 0
        assert nothing_of(node, built_closure)
        # Naming it: the closure comes from it, references included, verified.
        await want(bus, "n1", built_closure, binary_cache=url, who="own")
        await eventually(lambda: has_closure(node, built_closure), 60)
    await verify_store(node)
    assert len(served.nar_requests) == len(built_closure.paths)
    assert set(served.nar_requests.values()) == {1}


async def test_a_cache_or_key_the_node_does_not_allow_fails_the_want_and_is_never_asked(
    bus: Bus,
    start_node: StartNode,
    built_closure: BuiltClosure,
    make_file_cache: Callable[..., FileCache],
) -> None:
    own = make_file_cache(built_closure.paths, "none")
    stranger = SecretKey.generate("stranger-1").public_key
    async with counting_cache(own.dir) as (url, served):
        closed = await start_node("closed")  # NIPHAS_MESH_WORKLOAD_CACHES empty: none allowed
        listed = await start_node("listed", workload_caches=f"{url}/")
        await ready(closed)
        await ready(listed)
        # Deadlines far off: the refusals come at once, not when a deadline passes.
        await want(bus, "closed", built_closure, within_s=600, binary_cache=url)
        await want(
            bus,
            "listed",
            built_closure,
            within_s=600,
            binary_cache=url,
            binary_cache_public_key=str(stranger),
        )
        not_listed = await failed_with(bus, closed, built_closure.app)
        untrusted = await failed_with(bus, listed, built_closure.app)
        assert f"binary cache {url} is not in NIPHAS_MESH_WORKLOAD_CACHES" in not_listed
        assert str(stranger) in untrusted
        assert "add it to NIPHAS_MESH_TRUSTED_PUBLIC_KEYS" in untrusted
        assert served.requests == 0
    assert nothing_of(closed, built_closure)
    assert nothing_of(listed, built_closure)


async def test_an_allowed_cache_signing_with_an_untrusted_key_is_refused(
    bus: Bus,
    start_node: StartNode,
    built_closure: BuiltClosure,
    nix_runner: NixRunner,
    tmp_path: Path,
) -> None:
    key = SecretKey.generate("stranger-1")
    key_file = tmp_path / "stranger.sk"
    key_file.write_text(str(key))
    directory = tmp_path / "stranger-cache"
    nix_runner.copy(
        built_closure.paths, to=f"file://{directory}?compression=none&secret-key={key_file}"
    )
    async with counting_cache(directory) as (url, served):
        node = await start_node("n1", workload_caches=f"{url}/")
        await ready(node)
        await want(bus, "n1", built_closure, within_s=3, binary_cache=url)
        error = await failed_with(bus, node, built_closure.app)
        assert "signature" in error
        assert served.requests > 0  # it was asked (allowed) ...
        assert served.nar_bytes == 0  # ... but no NAR was taken on its word
    assert rejected("n1", url, "signature") >= 1
    assert nothing_of(node, built_closure)
