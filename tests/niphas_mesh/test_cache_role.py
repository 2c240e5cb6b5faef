"""The mesh in role `cache`: the cluster's binary cache. A real `nix copy --to http://...`
with netrc credentials uploads a multi-path closure (signed during the copy) and a stock
`nix copy --from` with the trusted key substitutes it; uploads without the token or with
another one get 401 and write nothing; names other than narinfos and NAR files are refused;
a narinfo that arrives before its NAR (or its references), a NAR whose bytes do not match its
name, and an upload cut off mid-body never become visible; temp files a crash left are removed
at start; without a token the cache says so (503, /readyz); `niphas mesh` runs the role
without NATS."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from niphas_common.nix.errors import CommandError
from niphas_common.nix.runner import NixRunner
from niphas_mesh.cache_role import CacheServer, start_cache
from niphas_mesh.settings import MeshSettings
from tests.nix_harness import BuiltClosure, CacheKey, FileCache

pytestmark = [pytest.mark.nix]

TOKEN = "t0ken-for-tests"
NO_DISK_CACHE = {"narinfo-cache-positive-ttl": "0", "narinfo-cache-negative-ttl": "0"}


@dataclass(frozen=True)
class Cache:
    url: str
    dir: Path
    token_file: Path

    def files(self) -> list[str]:
        """Every file in the cache directory (relative), temp files included."""
        return sorted(str(p.relative_to(self.dir)) for p in self.dir.rglob("*") if p.is_file())


StartCache = Callable[..., Coroutine[Any, Any, Cache]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def basic(token: str) -> dict[str, str]:
    """The Authorization header nix sends from a netrc entry."""
    return {"Authorization": "Basic " + base64.b64encode(f"niphas:{token}".encode()).decode()}


def netrc(tmp_path: Path, token: str, name: str = "netrc") -> Path:
    file = tmp_path / name
    file.write_text(f"machine 127.0.0.1 login niphas password {token}\n")
    return file


def uploader(netrc_file: Path | None) -> NixRunner:
    options = dict(NO_DISK_CACHE)
    if netrc_file is not None:
        options["netrc-file"] = str(netrc_file)
    return NixRunner(options=options)


def push_url(cache: Cache, key: CacheKey) -> str:
    return f"{cache.url}?compression=zstd&secret-key={key.secret_file}"


@pytest.fixture
async def start(tmp_path: Path, cache_key: CacheKey) -> AsyncIterator[StartCache]:
    """Factory: `await start(token=...)` -> a cache (role cache) on a loopback port."""
    servers: list[CacheServer] = []

    async def run(token: str | None = TOKEN, **overrides: Any) -> Cache:
        token_file = tmp_path / "upload-token"
        if token is not None:
            token_file.write_text(f"{token}\n")
        fields: dict[str, Any] = {
            "role": "cache",
            "listen": "127.0.0.1:0",
            "cache_dir": tmp_path / "cluster-cache",
            "state_dir": tmp_path / "state",
            "upload_token_file": token_file,
            "trusted_public_keys": str(cache_key.public),
            **overrides,
        }
        server = await start_cache(MeshSettings(**fields))
        servers.append(server)
        return Cache(server.url, tmp_path / "cluster-cache", token_file)

    yield run
    for server in servers:
        await server.close()


async def test_nix_copy_uploads_a_closure_and_a_stock_client_substitutes_it(
    start: StartCache,
    built_closure: BuiltClosure,
    cache_key: CacheKey,
    tmp_path: Path,
) -> None:
    cache = await start()
    await uploader(netrc(tmp_path, TOKEN)).acopy([built_closure.app], to=push_url(cache, cache_key))

    names = cache.files()
    assert len([n for n in names if n.endswith(".narinfo")]) == len(built_closure.paths) == 3
    assert all(n.endswith(".narinfo") or n.endswith(".nar.zst") for n in names), names
    # A stock client, trusting the key, substitutes the whole closure over HTTP.
    dest = tmp_path / "client"
    client = NixRunner(
        store=str(dest), options={**NO_DISK_CACHE, "trusted-public-keys": str(cache_key.public)}
    )
    await client.acopy([built_closure.app], src=cache.url, to=str(dest))
    assert set(await client.apath_info([built_closure.app], recursive=True)) == {
        str(p) for p in built_closure.paths
    }
    await client.arun("nix", "store", "verify", "--all")
    # ...and one trusting another key refuses it: the cache is a transport, the key the anchor.
    other = NixRunner(options={**NO_DISK_CACHE, "trusted-public-keys": "x-1:" + "A" * 43 + "="})
    with pytest.raises(CommandError, match="signature"):
        await other.acopy([built_closure.app], src=cache.url, to=str(tmp_path / "client2"))


async def test_uploads_without_the_token_get_401_and_write_nothing(
    start: StartCache,
    built_closure: BuiltClosure,
    cache_key: CacheKey,
    tmp_path: Path,
) -> None:
    cache = await start()
    for netrc_file in (None, netrc(tmp_path, "wrong-token", "bad-netrc")):
        with pytest.raises(CommandError, match="401"):
            await uploader(netrc_file).acopy([built_closure.app], to=push_url(cache, cache_key))
    async with aiohttp.ClientSession() as http:
        async with http.put(f"{cache.url}/{'a' * 32}.narinfo", data=b"x") as resp:
            assert resp.status == 401
            assert "upload token" in await resp.text()
            assert resp.headers["WWW-Authenticate"].startswith("Basic")
        bad = basic("nope")
        async with http.put(f"{cache.url}/nar/{'0' * 52}.nar", data=b"x", headers=bad) as resp:
            assert resp.status == 401
    assert cache.files() == []


async def test_unsigned_derivations_and_sources_prove_themselves_outputs_do_not(
    start: StartCache,
    built_closure: BuiltClosure,
    nix_runner: NixRunner,
    tmp_path: Path,
) -> None:
    """What eval workers upload for build pods: a `.drv` closure, unsigned. The cache takes
    each `.drv` and source because its bytes prove its path (Nix substitutes them unsigned
    too); an unsigned build output, or a `.drv` narinfo moved to another path, is refused."""
    cache = await start()
    tree = tmp_path / "niphas-proven-src"
    tree.mkdir()
    (tree / "main.sh").write_text("echo proven > $out\n")
    expr = (
        'derivation { name = "niphas-proven"; system = builtins.currentSystem; '
        'builder = "/bin/sh"; args = [ "-c" "echo proven > $out" ]; '
        f'src = builtins.path {{ path = {tree}; name = "niphas-proven-src"; }}; }}'
    )
    drv = nix_runner.run("nix-instantiate", "--expr", expr).text.strip()
    unsigned = uploader(netrc(tmp_path, TOKEN))
    await unsigned.arun("nix", "copy", "--derivation", "--to", f"{cache.url}?compression=zstd", drv)
    drv_info = (cache.dir / f"{drv.removeprefix('/nix/store/')[:32]}.narinfo").read_text()
    assert "Sig:" not in drv_info and "CA: text:" in drv_info
    assert len([n for n in cache.files() if n.endswith(".narinfo")]) == 2  # the .drv, its src

    with pytest.raises(CommandError, match=r"not a \.drv or source whose content proves"):
        await unsigned.acopy([built_closure.app], to=f"{cache.url}?compression=zstd")
    assert not any(built_closure.app.hash_part in n for n in cache.files())

    # The same narinfo and NAR claimed for another path: its bytes do not hash to that one.
    other = "0" * 31 + "1"
    forged = drv_info.replace(drv.removeprefix("/nix/store/")[:32], other)
    async with aiohttp.ClientSession() as http:
        url = f"{cache.url}/{other}.narinfo"
        async with http.put(url, data=forged.encode(), headers=basic(TOKEN)) as resp:
            assert resp.status == 409 and "do not hash to its path" in await resp.text()
    assert not (cache.dir / f"{other}.narinfo").exists()


async def test_only_narinfos_and_nar_files_can_be_written(
    start: StartCache, tmp_path: Path
) -> None:
    cache = await start()
    auth = basic(TOKEN)
    names = [
        "nix-cache-info",
        "%2e%2e/escaped.narinfo",
        "nar/%2e%2e/%2e%2e/escaped.narinfo",
        "nar/..%2f..%2fescaped",
        f"nar/{'0' * 52}.nar.xz",
        f"{'a' * 32}.narinfo.bak",
        f"{'e' * 32}.narinfo",  # `e` is not a nix32 letter
        "log/foo",
        "index.html",
    ]
    async with aiohttp.ClientSession() as http:
        for name in names:
            url = URL(f"{cache.url}/{name}", encoded=True)
            async with http.put(url, data=b"StoreDir: /tmp\n", headers=auth) as resp:
                assert 400 <= resp.status < 500, (name, resp.status)
        async with http.get(f"{cache.url}/nix-cache-info") as resp:
            assert "StoreDir: /nix/store" in await resp.text()
    assert cache.files() == []
    assert not list(tmp_path.rglob("escaped*"))


async def test_a_narinfo_never_becomes_visible_before_its_nar(
    start: StartCache,
    built_closure: BuiltClosure,
    make_file_cache: Callable[..., FileCache],
) -> None:
    """Uploads in the wrong order, corrupt, or unsigned are refused; a reader never sees a
    narinfo whose NAR or references are missing."""
    cache = await start()
    source = make_file_cache(built_closure.paths, "zstd").dir
    app = built_closure.app.hash_part
    narinfo = (source / f"{app}.narinfo").read_text()
    nar_name = next(line.split(": ")[1] for line in narinfo.splitlines() if line[:4] == "URL:")
    nar = (source / nar_name).read_bytes()
    async with aiohttp.ClientSession(headers=basic(TOKEN)) as http:

        async def put(name: str, body: bytes) -> tuple[int, str]:
            async with http.put(f"{cache.url}/{name}", data=body) as resp:
                return resp.status, await resp.text()

        async def visible(name: str) -> bool:
            async with http.head(f"{cache.url}/{name}") as resp:
                return resp.status == 200

        status, text = await put(f"{app}.narinfo", narinfo.encode())
        assert status == 409 and "not uploaded yet" in text
        assert not await visible(f"{app}.narinfo")
        # A truncated NAR under its name is refused: its bytes do not hash to the name.
        assert (await put(nar_name, nar[:-10]))[0] == 400
        assert not await visible(nar_name)
        assert (await put(nar_name, nar))[0] == 201
        # The NAR is here, but app's references (lib, tools) are not.
        status, text = await put(f"{app}.narinfo", narinfo.encode())
        assert status == 409 and "references not in the cache" in text
        # An unsigned narinfo is refused too (the cache trusts the cluster key only).
        unsigned = "".join(line + "\n" for line in narinfo.splitlines() if line[:4] != "Sig:")
        assert (await put(f"{app}.narinfo", unsigned.encode()))[0] == 409
        assert not await visible(f"{app}.narinfo")
    assert not [n for n in cache.files() if n.endswith(".narinfo") or "upload" in n]


async def test_an_upload_cut_off_mid_body_leaves_nothing(start: StartCache, tmp_path: Path) -> None:
    cache = await start()
    name = f"nar/{'0' * 52}.nar"
    host, port = URL(cache.url).host, URL(cache.url).port
    _, writer = await asyncio.open_connection(host, port)
    auth = basic(TOKEN)["Authorization"]
    writer.write(
        f"PUT /{name} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {auth}\r\n"
        f"Content-Length: 1000000\r\n\r\n".encode()
        + b"x" * 300_000
    )
    await writer.drain()
    for _ in range(50):  # the server is writing the temp file now
        if any(".upload-" in n for n in cache.files()):
            break
        await asyncio.sleep(0.05)
    writer.close()  # the client dies mid-body
    for _ in range(100):
        if not cache.files():
            break
        await asyncio.sleep(0.05)
    assert cache.files() == []


async def test_temp_files_of_a_crashed_run_are_removed_at_start(
    start: StartCache, tmp_path: Path
) -> None:
    leftover = tmp_path / "cluster-cache" / "nar" / ".upload-abc123"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"half a NAR")
    cache = await start()
    assert cache.files() == []


async def test_without_a_token_uploads_get_503_and_readiness_says_why(
    start: StartCache,
) -> None:
    cache = await start(token=None)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{cache.url}/readyz") as resp:
            assert resp.status == 503
            assert "niphas-cache-upload" in await resp.text()
        auth = basic(TOKEN)
        async with http.put(f"{cache.url}/{'a' * 32}.narinfo", data=b"x", headers=auth) as resp:
            assert resp.status == 503
            assert "no upload token" in await resp.text()
        cache.token_file.write_text(TOKEN)  # the Secret appears: no restart needed
        async with http.get(f"{cache.url}/readyz") as resp:
            assert resp.status == 200


async def test_niphas_mesh_runs_the_cache_role_without_nats(tmp_path: Path) -> None:
    port, ops = free_port(), free_port()
    env = {
        "NIPHAS_MESH_METRICS_PORT": str(ops),
        **os.environ,
        "NIPHAS_MESH_ROLE": "cache",
        "NIPHAS_MESH_CACHE_DIR": str(tmp_path / "c"),
        "NIPHAS_MESH_UPLOAD_TOKEN_FILE": str(tmp_path / "token"),
        "NATS_URL": "nats://127.0.0.1:1",  # nothing there: the role must not need it
    }
    (tmp_path / "token").write_text(TOKEN)
    niphas = str(Path(sys.executable).with_name("niphas"))
    cmd = [niphas, "mesh", "--listen", f"127.0.0.1:{port}"]
    log = (tmp_path / "cache.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, stderr=log)
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                try:
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)
            else:
                raise AssertionError((tmp_path / "cache.log").read_text())
            async with http.get(f"http://127.0.0.1:{port}/nix-cache-info") as resp:
                assert "StoreDir: /nix/store" in await resp.text()
            async with http.get(f"http://127.0.0.1:{ops}/metrics") as resp:
                assert "niphas_mesh_served_bytes_total" in await resp.text()
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
        log.close()
