"""A mesh agent killed mid-fetch cleans up when it starts again. A `niphas mesh` process (its
own process group) wants two paths from a real signed cache over HTTP: a 4,000-file path it
downloads and starts importing, and a path whose NAR the cache holds at half way. While Nix is
restoring the first (its `.lock` and partial tree are in the store), the agent and its
`nix copy` are SIGKILLed (the `nix copy` is frozen first, so the agent cannot clean up after
it), as when a node's pod is OOM-killed. Left behind: the partial tree and its lock in the
store, the landed NAR and narinfo of the first path and the `.<hash>.nar.partial` of the second
in `incoming/`. A new agent over the same store and state removes all of it on start, leaves
the valid path that was there untouched, and then fetches both paths (without waiting for the
killed run, whose `fetching` announcements name another port)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from niphas_common.bus.bus import Bus
from niphas_common.nix.runner import NixRunner
from niphas_common.nix.store_path import StorePath
from niphas_schemas import PathWanted
from tests.faults.test_disk_full import leftovers
from tests.faults.test_large_nar import ready as http_ready
from tests.helpers import eventually
from tests.niphas_mesh.conftest import StartNode, ready, seed
from tests.niphas_mesh.servers import counting_cache, nar_file
from tests.niphas_mesh.test_fetch import announce_cache, rejected, verify_store
from tests.nix_harness import BuiltClosure, CacheKey, FileCache

pytestmark = [pytest.mark.nix, pytest.mark.root, pytest.mark.slow]

NODE = "crash"
Popen = subprocess.Popen[bytes]
MANY_FILES = 4000
"""Files of the path being imported at the kill: Nix takes a while to restore them."""


@pytest.fixture
def paths(nix_runner: NixRunner, tmp_path: Path) -> Iterator[dict[str, StorePath]]:
    """`many` (4,000 small files), `held` (4 MB) and `kept` (already on the node)."""
    made = {}
    for name, files, size in (("many", MANY_FILES, 8 << 10), ("held", 2, 2 << 20), ("kept", 1, 1)):
        d = tmp_path / "src" / f"niphas-crash-{name}"
        d.mkdir(parents=True)
        for i in range(files):
            (d / f"f{i}").write_bytes(os.urandom(size))
        made[name] = d
    out = nix_runner.run("nix-store", "--add", *map(str, made.values())).text.split()
    added = {name: StorePath.parse(p) for name, p in zip(made, out, strict=True)}
    try:
        yield added
    finally:
        nix_runner.delete(list(added.values()), check=False)


def start_agent_process(tmp_path: Path, nats_url: str, key: CacheKey) -> tuple[Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "NIPHAS_MESH_STATE_DIR": str(tmp_path / "state"),
        "NIPHAS_MESH_TRUSTED_PUBLIC_KEYS": str(key.public),
        "NIPHAS_MESH_PEER_WAIT_S": "0",
        "NIPHAS_MESH_STALL_TIMEOUT_S": "60",  # the held NAR must not be abandoned
        "NIPHAS_LOG_LEVEL": "WARNING",
    }
    niphas = str(Path(sys.executable).with_name("niphas"))
    argv = [niphas, "mesh", "--listen", f"127.0.0.1:{port}", "--node", NODE, "--nats-url"]
    argv += [nats_url, "--store-root", str(tmp_path / "nodes" / NODE)]
    proc = subprocess.Popen(argv, env=env, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}/readyz"


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with_children = task / "children"
        if with_children.exists():
            found += [int(c) for c in with_children.read_text().split()]
    return found


def kill_mid_import(agent: Popen, lock: Path, tree: Path) -> None:
    """Once `lock` and `tree` exist (Nix is restoring that path; it takes the lock a moment
    before it creates the tree): freeze the agent's `nix copy`, kill the agent, then the
    `nix copy` (each nix runs in its own process group)."""
    deadline = time.monotonic() + 120
    while not (lock.exists() and tree.is_dir()):
        assert agent.poll() is None, "the agent exited"
        assert time.monotonic() < deadline, f"Nix never started restoring {tree}"
        time.sleep(0.002)
    copies = [c for c in children(agent.pid) if b"copy" in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert copies, "no nix copy was running"
    for child in copies:
        os.killpg(child, signal.SIGSTOP)
    os.killpg(agent.pid, signal.SIGKILL)
    agent.wait()
    for child in copies:
        os.killpg(child, signal.SIGKILL)


async def test_a_restarted_agent_removes_what_the_killed_one_left(
    bus: Bus,
    nats_url: str,
    start_node: StartNode,
    paths: dict[str, StorePath],
    nix_runner: NixRunner,
    make_file_cache: Callable[..., FileCache],
    cache_key: CacheKey,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    many, held, kept = paths["many"], paths["held"], paths["kept"]
    cache = make_file_cache(list(paths.values()), "none")
    root = tmp_path / "nodes" / NODE
    seed(root, cache, cache_key, [kept])
    real = root / "nix" / "store"
    incoming = tmp_path / "state" / "mesh" / NODE / "incoming"
    wanted = BuiltClosure(many, nix_runner.path_info([many, held]))
    hold = asyncio.Event()
    only = {nar_file(cache.dir, held.hash_part)}
    async with counting_cache(cache.dir, hold, only=only) as (cache_url, _):
        await announce_cache(bus, cache_url, wanted)
        agent, readyz = start_agent_process(tmp_path, nats_url, cache_key)
        try:
            await http_ready(readyz, agent)
            await publish_want(bus, [many, held], "before")
            lock = real / f"{many.base_name}.lock"
            await asyncio.to_thread(kill_mid_import, agent, lock, real / many.base_name)
        finally:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()

        # What the crash left (if the import had finished, the test would prove nothing).
        assert str(many) not in valid(root)
        assert (real / many.base_name).is_dir() and lock.exists()
        assert (incoming / f"{many.hash_part}.narinfo").exists()
        assert (incoming / "nar" / f"{many.hash_part}.nar").exists()
        assert (incoming / "nar" / f".{held.hash_part}.nar.partial").exists()

        caplog.set_level(logging.INFO, logger="niphas_mesh.leftovers")
        node = await start_node(NODE)
        assert [p for p in incoming.rglob("*") if p.is_file()] == [incoming / "nix-cache-info"]
        assert leftovers(node) == set()
        assert valid(root) == {str(kept)}
        assert str(real / many.base_name) in caplog.text

        hold.set()
        await ready(node)
        await publish_want(bus, [many, held], "after")  # (the same Msg-Id would be dropped)
        await eventually(lambda: many in node.store and held in node.store, 60)
    await verify_store(node)
    assert leftovers(node) == set()
    # The killed run's `fetching` announcements (at its old port) were not waited for.
    assert rejected(NODE, NODE, "error") == 0


async def publish_want(bus: Bus, paths: list[StorePath], who: str) -> None:
    deadline = datetime.now(UTC) + timedelta(seconds=60)
    await bus.publish(
        PathWanted(node=NODE, store_paths=tuple(map(str, paths)), deadline=deadline, requester=who)
    )


def valid(root: Path) -> set[str]:
    return set(NixRunner(store=str(root)).run("nix", "path-info", "--all").text.split())
