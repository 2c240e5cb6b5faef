"""The agent as a standard Nix binary cache: a stock `nix copy --from http://<node>` and
`nix-store -r` with the node as substituter (signatures checked: a wrong key is refused),
nix-cache-info, 404 for what the node lacks or for a path no endpoint answers, 405 for a
method other than GET/HEAD, HEAD and byte ranges, zstd, the cache directory served beside the
store, the ops endpoints on the cache's port, and `niphas mesh` started from the command
line."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from niphas_common.nix.errors import CommandError
from niphas_common.nix.nar import nar_bytes
from niphas_common.nix.runner import NixRunner
from tests.niphas_mesh.conftest import StartNode, ready, seed
from tests.niphas_mesh.test_cache_role import NO_DISK_CACHE
from tests.nix_harness import BuiltClosure, CacheKey, FileCache

pytestmark = [pytest.mark.nix, pytest.mark.root]
# Clients keep no narinfo cache: ports come round again, and a narinfo another test's node
# served on the same URL (signed by that test's key) must not stand in for this node's.


async def test_stock_nix_copy_and_substitute_from_a_node(
    start_node: StartNode,
    built_closure: BuiltClosure,
    signed_cache: FileCache,
    cache_key: CacheKey,
    tmp_path: Path,
) -> None:
    seed(tmp_path / "nodes" / "n1", signed_cache, cache_key, [built_closure.app])
    agent = await start_node("n1")
    await ready(agent)
    trusted = {"trusted-public-keys": str(cache_key.public), **NO_DISK_CACHE}

    dest = tmp_path / "client1"
    client = NixRunner(store=str(dest), options=trusted)
    await client.acopy([built_closure.app], src=agent.url, to=str(dest))
    infos = await client.apath_info([built_closure.app], recursive=True)
    assert set(infos) == {str(p) for p in built_closure.paths}
    assert all(info.signatures for info in infos.values())
    await client.arun("nix", "store", "verify", "--all")

    # nix-store -r with the node as the only substituter.
    dest2 = tmp_path / "client2"
    sub = NixRunner(store=str(dest2), options={**trusted, "substituters": agent.url})
    await sub.arun("nix-store", "-r", str(built_closure.app))
    assert str(built_closure.app) in await sub.apath_info([built_closure.app])

    # A client trusting another key refuses the node's (the builder's) signatures.
    other = NixRunner(
        store=str(tmp_path / "client3"),
        options={"trusted-public-keys": "other-1:" + "A" * 43 + "=", **NO_DISK_CACHE},
    )
    with pytest.raises(CommandError, match="signature"):
        await other.acopy([built_closure.app], src=agent.url, to=str(tmp_path / "client3"))


async def test_http_surface(
    start_node: StartNode,
    built_closure: BuiltClosure,
    signed_cache: FileCache,
    cache_key: CacheKey,
    tmp_path: Path,
) -> None:
    seed(tmp_path / "nodes" / "n1", signed_cache, cache_key, [built_closure.app])
    agent = await start_node("n1")
    await ready(agent)
    app = built_closure.app
    expected = nar_bytes(tmp_path / "nodes" / "n1" / "nix" / "store" / app.base_name)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{agent.url}/nix-cache-info") as resp:
            text = await resp.text()
        assert "StoreDir: /nix/store" in text
        assert "WantMassQuery: 1" in text
        async with http.get(f"{agent.url}/{app.hash_part}.narinfo") as resp:
            assert resp.status == 200
            narinfo = await resp.text()
        assert f"StorePath: {app}" in narinfo
        assert "Compression: none" in narinfo
        assert f"Sig: {cache_key.secret.name}:" in narinfo
        url = narinfo.split("URL: ")[1].split("\n")[0]
        async with http.get(f"{agent.url}/{url}") as resp:
            assert await resp.read() == expected
        async with http.head(f"{agent.url}/{url}") as resp:
            assert resp.status == 200
            assert int(resp.headers["Content-Length"]) == len(expected)
        async with http.get(f"{agent.url}/{url}", headers={"Range": "bytes=8-99"}) as resp:
            assert resp.status == 206
            assert await resp.read() == expected[8:100]
        async with http.get(f"{agent.url}/{url}", headers={"Range": "bytes=-5"}) as resp:
            assert await resp.read() == expected[-5:]
        async with http.head(f"{agent.url}/{app.hash_part}.narinfo") as resp:
            assert resp.status == 200
            assert int(resp.headers["Content-Length"]) == len(narinfo.encode())
        missing = "0" * 32
        for path in (
            f"{missing}.narinfo",
            f"nar/{missing}.nar",
            "nar/..%2Fsecret",
            f"nar/x/{app.hash_part}.nar",
            f"x/{app.hash_part}.narinfo",
            f"{app.hash_part}.narinfo.x",
            "nar/",
            "elsewhere",
        ):
            async with http.get(f"{agent.url}/{path}") as resp:
                assert resp.status == 404, path
        # Only GET and HEAD: the cache is read-only (uploads go to the cache role).
        async with http.post(f"{agent.url}/{app.hash_part}.narinfo", data=b"x") as resp:
            assert resp.status == 405
            assert resp.headers["Allow"] == "GET,HEAD"
        async with http.get(f"{agent.url}/metrics") as resp:
            assert "niphas_mesh_served_bytes_total" in await resp.text()
        async with http.get(f"{agent.url}/healthz") as resp:
            assert (resp.status, await resp.text()) == (200, "ok\n")
        async with http.get(f"{agent.url}/readyz") as resp:
            assert (resp.status, await resp.text()) == (200, "ready\n")


async def test_cache_dir_files_and_compressed_own_paths(
    start_node: StartNode,
    built_closure: BuiltClosure,
    signed_cache: FileCache,
    cache_key: CacheKey,
    tmp_path: Path,
) -> None:
    seed(tmp_path / "n1", signed_cache, cache_key, [built_closure.app])
    app = built_closure.app
    expected = nar_bytes(tmp_path / "n1" / "nix" / "store" / app.base_name)
    zst = await start_node("n2", nar_compression="zstd", cache_dir=signed_cache.dir)
    await ready(zst)
    async with aiohttp.ClientSession() as http:
        # n2 holds nothing itself: the cache directory's narinfo and NAR files are served.
        async with http.get(f"{zst.url}/{app.hash_part}.narinfo") as resp:
            assert resp.status == 200
            cached = await resp.text()
        cached_url = cached.split("URL: ")[1].split("\n")[0]
        async with http.get(f"{zst.url}/{cached_url}") as resp:
            assert resp.status == 200
            assert len(await resp.read()) == len(expected)

    # The zstd node serves its own paths compressed; a stock client reads them.
    seed(tmp_path / "nodes" / "n2", signed_cache, cache_key, [app])
    await zst.reconcile()
    dest = tmp_path / "client-zstd"
    options = {"trusted-public-keys": str(cache_key.public), **NO_DISK_CACHE}
    client = NixRunner(store=str(dest), options=options)
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{zst.url}/{app.hash_part}.narinfo") as resp,
    ):
        assert "Compression: zstd" in await resp.text()
    await client.acopy([app], src=zst.url, to=str(dest))
    await client.arun("nix", "store", "verify", "--all")


@pytest.mark.slow
async def test_niphas_mesh_command(
    nats_url: str, tmp_path: Path, cache_key: CacheKey, unused_tcp_port: int
) -> None:
    niphas = str(Path(sys.executable).with_name("niphas"))
    env = {
        **os.environ,
        "NIPHAS_MESH_STATE_DIR": str(tmp_path / "state"),
        "NIPHAS_MESH_TRUSTED_PUBLIC_KEYS": str(cache_key.public),
    }
    proc = subprocess.Popen(
        [
            niphas, "mesh", "--listen", f"127.0.0.1:{unused_tcp_port}",
            "--store-root", str(tmp_path / "node"), "--nats-url", nats_url, "--node", "cli-node",
        ],
        env=env,
    )  # fmt: skip
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(300):
                try:
                    async with http.get(f"http://127.0.0.1:{unused_tcp_port}/readyz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("niphas mesh never became ready")
            url = f"http://127.0.0.1:{unused_tcp_port}/nix-cache-info"
            async with http.get(url) as resp:
                assert "StoreDir: /nix/store" in await resp.text()
        # A second agent for the same node and state refuses to start, and says why.
        twin = await asyncio.to_thread(
            subprocess.run,
            [
                niphas, "mesh", "--listen", "127.0.0.1:0", "--store-root", str(tmp_path / "node"),
                "--nats-url", nats_url, "--node", "cli-node",
            ],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert twin.returncode == 2
        assert f"another mesh agent for node cli-node (pid {proc.pid})" in twin.stderr
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
