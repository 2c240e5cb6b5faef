"""A NAR far larger than the memory allowed for it streams through: a `niphas mesh` agent (its
own process) fetches a 1 GiB store path from a signed cache served over HTTP and imports it.
The agent's peak RSS (VmHWM) and that of every `nix` it runs (GNU time's maximum resident
set size, through a `nix` wrapper first on its PATH) stay under a quarter of the NAR size, and
the imported path verifies. No cgroups: the bound is read from the kernel's own counters."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from niphas_common.bus.bus import Bus
from niphas_common.nix.runner import NixRunner
from niphas_common.nix.store_path import StorePath
from niphas_schemas import PathAvailable, PathWanted
from tests.helpers import eventually
from tests.niphas_mesh.servers import serve
from tests.nix_harness import CacheKey

pytestmark = [pytest.mark.nix, pytest.mark.root, pytest.mark.slow]

NAR_MB = int(os.environ.get("NIPHAS_FAULT_NAR_MB", "1024"))
RSS_BOUND_KB = (NAR_MB << 10) // 4
"""A quarter of the NAR: buffering it whole (or a large part of it) fails the test."""


@pytest.fixture
def large_cache(nix_runner: NixRunner, cache_key: CacheKey, tmp_path: Path) -> Iterator[Path]:
    """A signed uncompressed cache holding one NAR_MB path (gone from the host store again)."""
    src = tmp_path / "src" / "niphas-fault-large"
    src.mkdir(parents=True)
    block = os.urandom(1 << 20)
    with open(src / "blob", "wb") as f:
        for i in range(NAR_MB):
            f.write(i.to_bytes(8, "little") + block[8:])  # every MiB distinct, cheap to make
    path = nix_runner.add_to_store(src)
    shutil.rmtree(src)
    cache = tmp_path / "cache"
    try:
        nix_runner.copy(
            [path], to=f"file://{cache}?compression=none&secret-key={cache_key.secret_file}"
        )
    finally:
        nix_runner.delete([path], check=False)
    yield cache
    shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture
async def cache_url(large_cache: Path) -> AsyncIterator[str]:
    """The cache over HTTP, streamed from disk (sendfile), never read into memory."""
    app = web.Application()
    app.router.add_static("/", large_cache)
    async with serve(app) as url:
        yield url


def nix_wrapper(directory: Path, log: Path) -> Path:
    """A `nix` that records each run's maximum RSS (KiB) in `log`, then is the real nix."""
    real = shutil.which("nix")
    assert real is not None
    assert Path("/usr/bin/time").exists(), "GNU time is missing: `make tools` installs it"
    directory.mkdir()
    wrapper = directory / "nix"
    wrapper.write_text(f'#!/bin/sh\nexec /usr/bin/time -a -o {log} -f "%M %C" {real} "$@"\n')
    wrapper.chmod(0o755)
    return directory


async def ready(url: str, agent: subprocess.Popen[bytes]) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(600):
            assert agent.poll() is None, "the agent exited"
            try:
                async with http.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url} never answered")


def peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for {pid}")


async def test_a_nar_larger_than_the_bound_streams_through(
    bus: Bus, nats_url: str, cache_url: str, cache_key: CacheKey, tmp_path: Path
) -> None:
    narinfo = next(p for p in (tmp_path / "cache").iterdir() if p.suffix == ".narinfo")
    store_path = StorePath.parse(
        next(line for line in narinfo.read_text().splitlines() if line.startswith("StorePath:"))
        .split(":", 1)[1]
        .strip()
    )
    rss_log = tmp_path / "nix-rss.log"
    wrapper = nix_wrapper(tmp_path / "wrapper", rss_log)
    root = tmp_path / "node"
    env = {
        **os.environ,
        "PATH": f"{wrapper}:{os.environ['PATH']}",
        "NIPHAS_MESH_STATE_DIR": str(tmp_path / "state"),
        "NIPHAS_MESH_TRUSTED_PUBLIC_KEYS": str(cache_key.public),
        "NIPHAS_MESH_FALLBACK_CACHES": cache_url,
        "NIPHAS_MESH_PEER_WAIT_S": "0",
        "NIPHAS_LOG_LEVEL": "WARNING",
    }
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    niphas = str(Path(sys.executable).with_name("niphas"))
    argv = [niphas, "mesh", "--listen", f"127.0.0.1:{port}", "--node", "big", "--store-root"]
    agent = subprocess.Popen([*argv, str(root), "--nats-url", nats_url], env=env)
    available = asyncio.Event()

    async def on_available(msg: object) -> None:
        event = PathAvailable.model_validate_json(msg.data)  # type: ignore[attr-defined]
        if (event.holder, event.store_path, event.state) == ("big", str(store_path), "available"):
            available.set()

    sub = await bus.nc.subscribe(PathAvailable.subject, cb=on_available)
    try:
        await ready(f"http://127.0.0.1:{port}/readyz", agent)
        deadline = datetime.now(UTC) + timedelta(minutes=3)
        await bus.publish(
            PathWanted(node="big", store_paths=(str(store_path),), deadline=deadline, requester="t")
        )
        await eventually(lambda: available.is_set() or agent.poll() is not None, 170)
        assert agent.poll() is None, "the agent died"
        agent_peak = peak_rss_kb(agent.pid)
    finally:
        await sub.unsubscribe()
        agent.terminate()
        agent.wait(30)

    runs = [line.split(" ", 1) for line in rss_log.read_text().splitlines() if line[:1].isdigit()]
    imports = [int(kb) for kb, cmd in runs if " copy " in cmd]
    assert imports, "the agent imported with nix copy"
    print(f"NAR {NAR_MB} MiB: agent peak {agent_peak} KiB, nix copy peak {max(imports)} KiB")
    assert agent_peak < RSS_BOUND_KB
    assert max(imports) < RSS_BOUND_KB
    keys = {"trusted-public-keys": str(cache_key.public)}
    NixRunner(store=str(root), options=keys).run("nix", "store", "verify", str(store_path))
    shutil.rmtree(root, ignore_errors=True)
