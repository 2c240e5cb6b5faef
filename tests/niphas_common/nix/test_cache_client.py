"""The binary-cache client against caches written by the real `nix copy --to file://...`
(zstd, none, xz, bzip2), read over file:// and over a real local HTTP server: whole closures
fetched, verified and unpacked exactly; tampered NARs and narinfos, untrusted keys, swapped
narinfos, truncated downloads and escaping URLs rejected with errors naming the path;
bounded concurrency of the closure walk."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import zstandard
from aiohttp import web

from niphas_common.nix.cache_client import BinaryCacheClient, parse_cache_info
from niphas_common.nix.errors import CacheError, NarError, SignatureError, VerificationError
from niphas_common.nix.hashes import Hash
from niphas_common.nix.nar import nar_hash
from niphas_common.nix.narinfo import NarInfo
from niphas_common.nix.runner import NixRunner
from niphas_common.nix.signing import SecretKey, TrustedKeys
from niphas_common.nix.store_path import StorePath
from tests.nix_harness import BuiltClosure, CacheKey, FileCache

pytestmark = pytest.mark.nix


class Serve:
    """Serves directories over HTTP on 127.0.0.1 (real aiohttp servers), counting how many
    requests are in flight at once."""

    def __init__(self) -> None:
        self.runners: list[web.AppRunner] = []
        self.in_flight = 0
        self.max_in_flight = 0

    @web.middleware
    async def _count(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.02)  # lets concurrent requests overlap measurably
            return await handler(request)
        finally:
            self.in_flight -= 1

    async def __call__(self, directory: Path) -> str:
        app = web.Application(middlewares=[self._count])
        app.router.add_static("/", directory)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        self.runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers = Serve()
    yield servers
    for runner in servers.runners:
        await runner.cleanup()


async def _url(cache: FileCache, transport: str, serve: Serve) -> str:
    return cache.url if transport == "file" else await serve(cache.dir)


def _narinfo_file(cache: FileCache, info_path: str) -> Path:
    return cache.dir / f"{info_path.removeprefix('/nix/store/')[:32]}.narinfo"


@pytest.mark.parametrize("transport", ["file", "http"])
@pytest.mark.parametrize("compression", ["zstd", "none", "xz", "bzip2"])
async def test_fetch_closure(
    built_closure: BuiltClosure,
    make_file_cache: Callable[..., FileCache],
    cache_key: CacheKey,
    serve: Serve,
    nix_runner: NixRunner,
    tmp_path: Path,
    compression: str,
    transport: str,
) -> None:
    cache = make_file_cache([built_closure.app], compression)
    dest = tmp_path / "fetched"
    dest.mkdir()
    async with BinaryCacheClient(await _url(cache, transport, serve), cache_key.trusted) as client:
        assert (await client.cache_info()).store_dir == "/nix/store"
        infos = await client.fetch_closure([built_closure.app], dest)
    assert {str(p) for p in infos} == set(built_closure.infos)
    assert {info.compression for info in infos.values()} == {compression}
    for path, expected in built_closure.infos.items():
        unpacked = dest / expected.path.base_name
        assert nar_hash(unpacked) == (expected.nar_hash, expected.nar_size), path
    app_dir = str(dest / built_closure.app.base_name)
    nix_says = nix_runner.run("nix", "hash", "path", "--base32", app_dir).text.strip()
    assert Hash.parse(nix_says, "sha256") == built_closure.infos[str(built_closure.app)].nar_hash


def _tamper_nar(cache: FileCache, info: NarInfo) -> NarInfo:
    """Change one byte of the NAR, recompress, and fix the unsigned FileHash/FileSize so
    that only the signed NarHash can catch it."""
    nar_file = cache.dir / info.url
    raw = nar_file.read_bytes()
    zstd = zstandard.ZstdDecompressor().decompressobj()
    nar = zstd.decompress(raw) if info.compression == "zstd" else raw
    i = nar.index(b"greeting") if b"greeting" in nar else len(nar) // 2
    bad = nar[:i] + bytes([nar[i] ^ 1]) + nar[i + 1 :]
    packed = zstandard.ZstdCompressor().compress(bad) if info.compression == "zstd" else bad
    nar_file.write_bytes(packed)
    text = _narinfo_file(cache, str(info.store_path)).read_text()
    text = re.sub(r"FileHash: .*", f"FileHash: {Hash.of(packed).nix32}", text)
    text = re.sub(r"FileSize: .*", f"FileSize: {len(packed)}", text)
    _narinfo_file(cache, str(info.store_path)).write_text(text)
    return NarInfo.parse(text)


@pytest.mark.parametrize("compression", ["zstd", "none"])
async def test_tampered_nar_rejected(
    built_closure: BuiltClosure,
    make_file_cache: Callable[..., FileCache],
    cache_key: CacheKey,
    serve: Serve,
    tmp_path: Path,
    compression: str,
) -> None:
    cache = make_file_cache([built_closure.app], compression)
    lib = next(p for p in built_closure.paths if p.name.endswith("-lib"))
    work = tmp_path / "work"
    work.mkdir()
    async with BinaryCacheClient(await serve(cache.dir), cache_key.trusted) as client:
        _tamper_nar(cache, await client.get_narinfo(lib))
        info = await client.get_narinfo(lib)  # still validly signed: NarHash unchanged
        with pytest.raises(VerificationError, match=f"{lib}: NarHash mismatch"):
            await client.unpack(info, work / "out")
        with pytest.raises(VerificationError, match=str(lib)):
            await client.download_nar(info, work / "lib.nar")
        assert os.listdir(work) == []  # neither a partial tree nor a partial NAR file
        dest = tmp_path / "closure"
        dest.mkdir()
        with pytest.raises(VerificationError, match=str(lib)):
            await client.fetch_closure([built_closure.app], dest)
        assert not (dest / lib.base_name).exists()


async def test_file_hash_and_file_size_are_checked(
    built_closure: BuiltClosure,
    make_file_cache: Callable[..., FileCache],
    cache_key: CacheKey,
    tmp_path: Path,
) -> None:
    """FileHash and FileSize are unsigned, but when a narinfo gives them the compressed file
    must match them: a wrong value is an error even though the NAR itself is intact."""
    cache = make_file_cache([built_closure.app], "zstd")
    app = str(built_closure.app)
    file = _narinfo_file(cache, app)
    original = file.read_text()
    client = BinaryCacheClient(cache.url, cache_key.trusted)
    edits = {
        "FileHash mismatch": re.sub(r"FileHash: .*", f"FileHash: {Hash.of(b'x').nix32}", original),
        "FileSize": re.sub(r"FileSize: (\d+)", lambda m: f"FileSize: {int(m[1]) + 1}", original),
    }
    for n, (error, text) in enumerate(edits.items()):
        file.write_text(text)
        info = await client.narinfo(app)
        assert info is not None
        with pytest.raises(VerificationError, match=f"{re.escape(app)}: {error}"):
            await client.download_nar(info, tmp_path / f"{n}.nar")
    file.write_text(original)
    info = await client.narinfo(app)
    assert info is not None
    await client.download_nar(info, tmp_path / "good.nar")
    assert (tmp_path / "good.nar").stat().st_size == info.nar_size


async def test_tampered_narinfo_rejected(
    built_closure: BuiltClosure,
    make_file_cache: Callable[..., FileCache],
    cache_key: CacheKey,
) -> None:
    cache = make_file_cache([built_closure.app], "zstd")
    app = str(built_closure.app)
    file = _narinfo_file(cache, app)
    original = file.read_text()
    client = BinaryCacheClient(cache.url, cache_key.trusted)
    edits: dict[str, Callable[[str], str]] = {
        "NarHash": lambda t: re.sub(r"NarHash: .*", f"NarHash: {Hash.of(b'x').nix32}", t),
        "NarSize": lambda t: re.sub(r"NarSize: (\d+)", lambda m: f"NarSize: {m[1]}0", t),
        "References": lambda t: re.sub(r"References: \S+ ", "References: ", t),
        "Sig": lambda t: re.sub(r"Sig: .*\n", "", t),
    }
    for what, edit in edits.items():
        changed = edit(original)
        assert changed != original, what
        file.write_text(changed)
        with pytest.raises(SignatureError, match=re.escape(app)):
            await client.narinfo(app)
    file.write_text(original.replace("URL: nar/", "URL: nar/../../../etc/"))
    with pytest.raises(SignatureError, match="refusing NAR URL"):
        await client.narinfo(app)
    file.write_text(original)
    assert (await client.narinfo(app)) is not None
    await client.close()


async def test_untrusted_key_and_swapped_narinfo(
    built_closure: BuiltClosure,
    make_file_cache: Callable[..., FileCache],
    cache_key: CacheKey,
) -> None:
    cache = make_file_cache([built_closure.app], "zstd")
    app = str(built_closure.app)
    stranger = TrustedKeys([SecretKey.generate(cache_key.secret.name).public_key])
    async with BinaryCacheClient(cache.url, stranger) as client:
        with pytest.raises(SignatureError, match=f"{re.escape(app)}: no valid signature"):
            await client.closure([app])
    # A validly signed narinfo of another path served under app's hash part:
    lib = next(p for p in built_closure.paths if p.name.endswith("-lib"))
    _narinfo_file(cache, app).write_text(_narinfo_file(cache, str(lib)).read_text())
    async with BinaryCacheClient(cache.url, cache_key.trusted) as client:
        with pytest.raises(VerificationError, match=f"{re.escape(app)}: the cache answered"):
            await client.narinfo(app)


async def test_truncated_download(
    built_closure: BuiltClosure,
    make_file_cache: Callable[..., FileCache],
    cache_key: CacheKey,
    serve: Serve,
    tmp_path: Path,
) -> None:
    cache = make_file_cache([built_closure.app], "zstd")
    async with BinaryCacheClient(await serve(cache.dir), cache_key.trusted) as client:
        info = await client.get_narinfo(built_closure.app)
        nar_file = cache.dir / info.url
        nar_file.write_bytes(nar_file.read_bytes()[:-5])
        with pytest.raises((VerificationError, NarError), match=str(built_closure.app)):
            await client.unpack(info, tmp_path / "out")
        assert not (tmp_path / "out").exists()


async def test_missing_path_and_bad_urls(cache_key: CacheKey, tmp_path: Path) -> None:
    (tmp_path / "nix-cache-info").write_text("StoreDir: /nix/store\nWantMassQuery: 1\n")
    missing = "/nix/store/" + "0" * 32 + "-missing"
    async with BinaryCacheClient(f"file://{tmp_path}", cache_key.trusted) as client:
        assert (await client.cache_info()).want_mass_query
        assert await client.narinfo(missing) is None
        with pytest.raises(CacheError, match=f"{missing}: not in the binary cache"):
            await client.get_narinfo(missing)
    with pytest.raises(CacheError, match="unsupported"):
        BinaryCacheClient("s3://bucket", None)
    (tmp_path / "nix-cache-info").write_text("StoreDir: /gnu/store\n")
    async with BinaryCacheClient(f"file://{tmp_path}", None) as client:
        with pytest.raises(CacheError, match="serves store /gnu/store"):
            await client.cache_info()
    assert parse_cache_info("Priority: 40\n").priority == 40


async def test_http_errors_are_cache_errors(cache_key: CacheKey) -> None:
    async with BinaryCacheClient("http://127.0.0.1:9", cache_key.trusted, timeout=2) as client:
        with pytest.raises(CacheError, match=re.escape("127.0.0.1:9")):
            await client.cache_info()


async def test_closure_walk_concurrency_is_bounded(
    built_closure: BuiltClosure,
    make_file_cache: Callable[..., FileCache],
    cache_key: CacheKey,
    serve: Serve,
) -> None:
    cache = make_file_cache([built_closure.app], "zstd")
    url = await serve(cache.dir)
    async with BinaryCacheClient(url, cache_key.trusted, concurrency=1) as client:
        infos = await client.closure([built_closure.app])
    assert len(infos) == len(built_closure.infos)
    assert serve.max_in_flight == 1
    # The measurement does see overlap when allowed: app's two references load together.
    serve.max_in_flight = 0
    async with BinaryCacheClient(url, cache_key.trusted, concurrency=8) as client:
        await client.closure([built_closure.app])
    assert serve.max_in_flight == 2


async def test_an_unsigned_source_is_proven_by_its_content(
    built_closure: BuiltClosure,
    make_file_cache: Callable[..., FileCache],
    cache_key: CacheKey,
    nix_runner: NixRunner,
    tmp_path: Path,
) -> None:
    """As in Nix: a source's path is the hash of its NAR, so it needs no signature; a build
    output still does, and a source whose NAR is not the one its path names is refused."""
    tree = tmp_path / "niphas-proven-source"
    tree.mkdir()
    (tree / "greeting").write_text("hello from a source\n")
    source = StorePath.parse(nix_runner.run("nix-store", "--add", str(tree)).text.strip())
    try:
        cache = make_file_cache([source, built_closure.app], "zstd")
        for path in (source, built_closure.app):
            file = _narinfo_file(cache, str(path))
            file.write_text(re.sub(r"(?m)^Sig: .*\n", "", file.read_text()))
        async with BinaryCacheClient(cache.url, cache_key.trusted) as client:
            info = await client.get_narinfo(source)
            assert info.sigs == () and (info.ca or "").startswith("fixed:r:sha256:")
            await client.unpack(info, tmp_path / "out")
            assert (tmp_path / "out" / "greeting").read_text() == "hello from a source\n"
            with pytest.raises(SignatureError, match="has no signatures"):
                await client.narinfo(built_closure.app)
            # Another NarHash names another path: the claim no longer proves this one.
            _tamper_nar(cache, info)
            forged = _narinfo_file(cache, str(source))
            text = forged.read_text()
            other = Hash.of(b"something else").nix32.partition(":")[2]
            forged.write_text(re.sub(r"NarHash: sha256:\S+", f"NarHash: sha256:{other}", text))
            with pytest.raises(SignatureError, match="has no signatures"):
                await client.narinfo(source)
            # The claimed NarHash kept, the bytes changed: caught while streaming.
            forged.write_text(text)
            with pytest.raises((VerificationError, NarError), match=str(source)):
                await client.unpack(await client.get_narinfo(source), tmp_path / "bad")
            assert not (tmp_path / "bad").exists()
    finally:
        nix_runner.delete([source], check=False)
