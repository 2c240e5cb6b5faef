"""The builder pushing to an HTTP cache that wants credentials: the in-cluster cache (`niphas
mesh` in role cache, run here as its own process). Configured with the cache's URL and its
upload token file, the builder builds, pushes the whole closure signed (nix uploads with PUT,
authenticated from the netrc the builder writes) and announces it; a stock nix client
substitutes it from the cache. The netrc holds the token for the cache's host only, mode 0600,
and only a path reaches the command line."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from niphas_builder.app import wired
from niphas_builder.cache import with_upload_credentials
from niphas_builder.settings import BuilderSettings
from niphas_common.bus.bus import Bus
from niphas_common.nix.runner import NixRunner
from niphas_schemas import BuildDone, PathAvailable
from tests.helpers import serving
from tests.nix_harness import CacheKey

from .conftest import BuildFlake
from .helpers import events

pytestmark = [pytest.mark.nix]

TOKEN = "upload-token-for-tests"
NO_DISK_CACHE = {"narinfo-cache-positive-ttl": "0", "narinfo-cache-negative-ttl": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def cluster_cache(tmp_path: Path, cache_key: CacheKey) -> Iterator[tuple[str, Path]]:
    """`niphas mesh` in role cache on a loopback port: its URL and directory."""
    port, directory = free_port(), tmp_path / "cluster-cache"
    (tmp_path / "upload-token").write_text(f"{TOKEN}\n")
    env = {
        **os.environ,
        "NIPHAS_MESH_ROLE": "cache",
        "NIPHAS_MESH_CACHE_DIR": str(directory),
        "NIPHAS_MESH_UPLOAD_TOKEN_FILE": str(tmp_path / "upload-token"),
        "NIPHAS_MESH_TRUSTED_PUBLIC_KEYS": str(cache_key.public),
    }
    niphas = str(Path(sys.executable).with_name("niphas"))
    with (tmp_path / "cache.log").open("wb") as log:
        proc = subprocess.Popen(
            [niphas, "mesh", "--listen", f"127.0.0.1:{port}"], env=env, stderr=log
        )
        try:
            yield f"http://127.0.0.1:{port}", directory
        finally:
            proc.terminate()
            proc.wait(10)


async def wait_ready(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(100):
            try:
                async with http.get(f"{url}/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url} never became ready")


async def test_builder_pushes_to_the_cluster_cache_with_its_token(
    bus: Bus,
    build_flake: Callable[..., BuildFlake],
    builder_settings: BuilderSettings,
    cluster_cache: tuple[str, Path],
    cache_key: CacheKey,
    nix_runner: NixRunner,
    tmp_path: Path,
) -> None:
    url, directory = cluster_cache
    await wait_ready(url)
    settings = builder_settings.model_copy(
        update={
            "cache_url": url,
            "cache_read_url": url,
            "cache_token_file": tmp_path / "upload-token",
        }
    )
    flake = build_flake()
    app = flake.attribute("app").outputs["out"]
    runner = NixRunner(options=NO_DISK_CACHE)
    async with wired(bus, settings, runner) as builder, serving(bus, [builder.subscription()]):
        await bus.publish(flake.eval_done("app"))
        for _ in range(600):
            if done := await events(bus, BuildDone):
                break
            await asyncio.sleep(0.1)
    [built] = done
    assert built.status == "built", built.log_tail
    assert built.cache_url == url
    closure = nix_runner.path_info([app], recursive=True)
    assert len(closure) == 3
    for path in closure:
        assert (directory / f"{path.split('/')[-1][:32]}.narinfo").is_file(), path
    announced = {e.store_path for e in await events(bus, PathAvailable)}
    assert announced >= set(closure)
    # A stock client substitutes the closure from the cache, trusting the cluster key.
    dest = tmp_path / "client"
    client = NixRunner(
        store=str(dest), options={**NO_DISK_CACHE, "trusted-public-keys": str(cache_key.public)}
    )
    await client.acopy([app], src=url, to=str(dest))
    await client.arun("nix", "store", "verify", "--all")


def test_upload_credentials_go_to_a_netrc_for_the_cache_host_only(tmp_path: Path) -> None:
    token_file, netrc = tmp_path / "token", tmp_path / "state" / "netrc"
    token_file.write_text(f"{TOKEN}\n")
    base = NixRunner(options={"a": "b"})
    runner = with_upload_credentials(
        base, "http://niphas-cache:8080?compression=zstd", token_file, netrc
    )
    assert netrc.read_text() == f"machine niphas-cache login niphas password {TOKEN}\n"
    assert netrc.stat().st_mode & 0o777 == 0o600
    assert runner.options == {"a": "b", "netrc-file": str(netrc)}
    assert TOKEN not in " ".join(runner.command("nix", "copy"))
    # Nothing to do for a file:// or s3:// cache, or without a token file.
    for url, file in [("file:///c", token_file), ("s3://b", token_file), ("http://c", None)]:
        assert with_upload_credentials(base, url, file, netrc) is base
    with pytest.raises(ValueError, match="niphas-cache-upload"):
        with_upload_credentials(base, "http://c", tmp_path / "missing", netrc)
