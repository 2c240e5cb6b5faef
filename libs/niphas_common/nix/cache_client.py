"""A client for Nix binary caches over http(s):// and file://.

A cache is a transport, never a trust anchor: every narinfo must name the path asked for and
carry a signature by a trusted key (or be a source, whose path is the hash of its NAR), and
every NAR is checked against the NarHash and NarSize while it streams (decompressed on the
fly). Callers only see data that verified: `download_nar` and `unpack` write to disk and
remove their output on any failure; `iter_nar` raises at the end of a stream that does not
match, so its consumers must treat the bytes as untrusted until the iteration completes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final
from urllib.parse import unquote, urlsplit

import aiohttp

from niphas_schemas.types import STORE_DIR

from .compression import decompressor
from .content_proof import is_source
from .errors import CacheError, NarError, NarinfoError, NixError, SignatureError, VerificationError
from .hashes import HashSink, NarVerifier
from .nar_parser import NarLimits
from .nar_restore import NarRestorer
from .narinfo import NarInfo
from .signing import TrustedKeys
from .store_path import StorePath, validate_hash_part

CHUNK_SIZE: Final = 1 << 20
DEFAULT_CONCURRENCY: Final = 8
"""Narinfo/NAR requests in flight at once during a closure walk or fetch."""
_NAR_URL_RE = re.compile(r"^[A-Za-z0-9+\-._=/]+$")


@dataclass(frozen=True, slots=True)
class CacheInfo:
    """The cache's `nix-cache-info`."""

    store_dir: str = STORE_DIR
    want_mass_query: bool = False
    priority: int = 50


def parse_cache_info(text: str) -> CacheInfo:
    fields = dict(
        (name.strip(), value.strip())
        for name, sep, value in (line.partition(":") for line in text.splitlines())
        if sep
    )
    try:
        return CacheInfo(
            store_dir=fields.get("StoreDir", STORE_DIR),
            want_mass_query=fields.get("WantMassQuery", "0") == "1",
            priority=int(fields.get("Priority", "50")),
        )
    except ValueError as exc:
        raise CacheError(f"invalid nix-cache-info: {exc}") from exc


class _Transport:
    async def get(self, rel: str) -> bytes | None:
        raise NotImplementedError

    def stream(self, rel: str) -> AsyncGenerator[bytes, None]:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class _FileTransport(_Transport):
    def __init__(self, root: Path) -> None:
        self.root = root

    async def get(self, rel: str) -> bytes | None:
        try:
            return await asyncio.to_thread((self.root / rel).read_bytes)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CacheError(f"cannot read {self.root / rel}: {exc}") from exc

    async def stream(self, rel: str) -> AsyncGenerator[bytes, None]:
        try:
            f = await asyncio.to_thread(open, self.root / rel, "rb")
        except OSError as exc:
            raise CacheError(f"cannot read {self.root / rel}: {exc}") from exc
        try:
            while chunk := await asyncio.to_thread(f.read, CHUNK_SIZE):
                yield chunk
        finally:
            f.close()


class _HttpTransport(_Transport):
    def __init__(self, base: str, session: aiohttp.ClientSession | None, timeout: float) -> None:
        self.base = base.rstrip("/")
        self._own = session is None
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
        self._session = session

    def _client(self) -> aiohttp.ClientSession:
        # Created lazily: a ClientSession must be made inside a running event loop.
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def get(self, rel: str) -> bytes | None:
        url = f"{self.base}/{rel}"
        try:
            async with self._client().get(url) as resp:
                if resp.status == 404:
                    return None
                if resp.status != 200:
                    raise CacheError(f"GET {url}: HTTP {resp.status}", status=resp.status)
                return await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise CacheError(f"GET {url}: {exc!r}") from exc

    async def stream(self, rel: str) -> AsyncGenerator[bytes, None]:
        url = f"{self.base}/{rel}"
        try:
            async with self._client().get(url) as resp:
                if resp.status != 200:
                    raise CacheError(f"GET {url}: HTTP {resp.status}", status=resp.status)
                async for chunk in resp.content.iter_chunked(CHUNK_SIZE):
                    yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise CacheError(f"GET {url}: {exc!r}") from exc

    async def close(self) -> None:
        if self._own and self._session is not None:
            await self._session.close()


class BinaryCacheClient:
    """Reads one binary cache and verifies everything it returns.

    `trusted_keys`: narinfos must carry a valid signature by one of them; passing None turns
    signature checks off (only for caches the caller itself just wrote).
    """

    def __init__(
        self,
        url: str,
        trusted_keys: TrustedKeys | None,
        *,
        session: aiohttp.ClientSession | None = None,
        concurrency: int = DEFAULT_CONCURRENCY,
        store_dir: str = STORE_DIR,
        timeout: float = 30.0,
    ) -> None:
        self.url = url
        self.trusted_keys = trusted_keys
        self.store_dir = store_dir
        self._limit = asyncio.Semaphore(concurrency)
        parts = urlsplit(url)
        if parts.scheme == "file":
            self._transport: _Transport = _FileTransport(Path(unquote(parts.path)))
        elif parts.scheme in ("http", "https"):
            self._transport = _HttpTransport(url, session, timeout)
        else:
            raise CacheError(f"unsupported binary cache URL {url!r} (want http(s):// or file://)")

    async def __aenter__(self) -> BinaryCacheClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._transport.close()

    async def cache_info(self) -> CacheInfo:
        text = await self._transport.get("nix-cache-info")
        if text is None:
            raise CacheError(f"{self.url} has no nix-cache-info")
        info = parse_cache_info(text.decode(errors="replace"))
        if info.store_dir != self.store_dir:
            raise CacheError(f"{self.url} serves store {info.store_dir}, not {self.store_dir}")
        return info

    async def narinfo(self, path: StorePath | str) -> NarInfo | None:
        """The verified narinfo of `path`, or None when the cache does not have it."""
        sp = path if isinstance(path, StorePath) else StorePath.parse(path, self.store_dir)
        info = await self._parsed(sp.hash_part, str(sp))
        if info is None:
            return None
        if info.store_path != sp:
            # A valid signature for another path must not be accepted for this one.
            raise VerificationError(f"{sp}: the cache answered with {info.store_path}")
        return self._verified(info)

    async def narinfo_by_hash(self, hash_part: str) -> NarInfo | None:
        """The verified narinfo of the path with `hash_part` (what a `<hash>.narinfo` request
        names), or None when the cache does not have it."""
        validate_hash_part(hash_part)
        info = await self._parsed(hash_part, f"{hash_part}.narinfo")
        if info is None:
            return None
        if info.hash_part != hash_part:
            raise VerificationError(f"{hash_part}.narinfo describes {info.store_path}")
        return self._verified(info)

    async def _parsed(self, hash_part: str, what: str) -> NarInfo | None:
        """`<hash_part>.narinfo` parsed (not yet verified); None when the cache lacks it."""
        async with self._limit:
            raw = await self._transport.get(f"{hash_part}.narinfo")
        if raw is None:
            return None
        try:
            return NarInfo.parse(raw.decode(), self.store_dir)
        except (UnicodeDecodeError, NarinfoError) as exc:
            raise NarinfoError(f"{what}: {exc}") from exc

    def _verified(self, info: NarInfo) -> NarInfo:
        """`info` once its signature (when keys are configured) and NAR URL are checked. A
        source needs no signature, as in Nix: its path is the hash of its NAR and references,
        and the NAR is checked against that NarHash as it streams."""
        if self.trusted_keys is not None and not is_source(info):
            info.check_signature(self.trusted_keys)
        _check_nar_url(info)
        return info

    async def get_narinfo(self, path: StorePath | str) -> NarInfo:
        info = await self.narinfo(path)
        if info is None:
            raise CacheError(f"{path}: not in the binary cache {self.url}")
        return info

    async def iter_nar(self, info: NarInfo) -> AsyncGenerator[bytes, None]:
        """The decompressed NAR, verified against NarHash/NarSize (and FileHash/FileSize)."""
        where = info.store_path
        nar = NarVerifier(info.nar_hash, info.nar_size, str(where))
        # The packed stream is hashed only when the narinfo gives a FileHash to compare with
        # (an uncompressed NAR would otherwise be hashed twice); its size is always counted.
        packed = HashSink(info.file_hash.algo) if info.file_hash else None
        packed_size = 0
        unpack = decompressor(info.compression)
        try:
            # aclosing: an error mid-stream must release the HTTP response/file right away.
            async with contextlib.aclosing(self._transport.stream(info.url)) as chunks:
                async for chunk in chunks:
                    packed_size += len(chunk)
                    if packed is not None:
                        packed.update(chunk)
                    if info.file_size is not None and packed_size > info.file_size:
                        raise VerificationError(f"larger than its FileSize {info.file_size}")
                    for piece in unpack.decompress(chunk):
                        nar.update(piece)
                        yield piece
            unpack.finish()
        except VerificationError as exc:
            msg = str(exc)
            raise VerificationError(
                msg if msg.startswith(f"{where}:") else f"{where}: {msg}"
            ) from exc
        except CacheError as exc:
            raise CacheError(f"{where}: {exc}", status=exc.status) from exc
        if packed is not None and packed.hash() != info.file_hash:
            raise VerificationError(f"{where}: FileHash mismatch (got {packed.hash().nix32})")
        if info.file_size is not None and packed_size != info.file_size:
            raise VerificationError(f"{where}: FileSize {packed_size} != {info.file_size}")
        nar.finish()

    async def download_nar(self, info: NarInfo, dest: str | os.PathLike[str]) -> None:
        """Write the verified, uncompressed NAR to `dest` (atomically, via a temp file)."""
        target = Path(dest)
        tmp = target.with_name(f".{target.name}.partial-{os.getpid()}-{id(info):x}")
        try:
            async with self._limit:
                f = await asyncio.to_thread(open, tmp, "wb")
                try:
                    async with contextlib.aclosing(self.iter_nar(info)) as pieces:
                        async for piece in pieces:
                            await asyncio.to_thread(f.write, piece)
                finally:
                    f.close()
            os.replace(tmp, target)
        except OSError as exc:
            raise CacheError(f"{info.store_path}: cannot write {target}: {exc}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    async def unpack(self, info: NarInfo, dest: str | os.PathLike[str]) -> None:
        """Unpack the verified NAR into `dest` (which must not exist); nothing stays on failure.

        Unpacking runs while the download streams; the verdict on NarHash arrives with the
        last byte, so a mismatch removes the whole tree again.
        """
        try:
            restorer = NarRestorer(dest, NarLimits(max_nar_size=info.nar_size))
        except NarError as exc:
            raise NarError(f"{info.store_path}: {exc}") from exc
        try:
            async with self._limit, contextlib.aclosing(self.iter_nar(info)) as pieces:
                async for piece in pieces:
                    restorer.feed(piece)
            restorer.finish()
        except NarError as exc:
            raise NarError(f"{info.store_path}: {exc}") from exc
        except BaseException:
            restorer.abort()
            raise

    async def closure(self, paths: Iterable[StorePath | str]) -> dict[StorePath, NarInfo]:
        """Verified narinfos of `paths` and everything they reference, transitively."""
        found: dict[StorePath, NarInfo] = {}
        seen: set[StorePath] = set()

        async def visit(sp: StorePath, tg: asyncio.TaskGroup) -> None:
            info = await self.get_narinfo(sp)
            found[sp] = info
            for ref in info.reference_paths():
                if ref not in seen:
                    seen.add(ref)
                    tg.create_task(visit(ref, tg))

        roots = [
            p if isinstance(p, StorePath) else StorePath.parse(p, self.store_dir) for p in paths
        ]
        await _run_all(lambda tg: [tg.create_task(visit(sp, tg)) for sp in _dedupe(roots, seen)])
        return found

    async def fetch_closure(
        self, paths: Iterable[StorePath | str], dest_dir: str | os.PathLike[str]
    ) -> dict[StorePath, NarInfo]:
        """Unpack the closure of `paths` as `dest_dir/<base name>`, skipping ones present."""
        infos = await self.closure(paths)
        root = Path(dest_dir)

        def start(tg: asyncio.TaskGroup) -> None:
            for sp, info in infos.items():
                if not os.path.lexists(root / sp.base_name):
                    tg.create_task(self.unpack(info, root / sp.base_name))

        await _run_all(start)
        return infos


def _dedupe(roots: list[StorePath], seen: set[StorePath]) -> list[StorePath]:
    fresh = []
    for sp in roots:
        if sp not in seen:
            seen.add(sp)
            fresh.append(sp)
    return fresh


async def _run_all(start: Callable[[asyncio.TaskGroup], object]) -> None:
    """Run tasks in a TaskGroup; re-raise the first failure itself, not an ExceptionGroup."""
    try:
        async with asyncio.TaskGroup() as tg:
            start(tg)
    except BaseExceptionGroup as group:
        raise _first_error(group) from None


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    errors: list[BaseException] = list(group.exceptions)
    first = next((e for e in errors if isinstance(e, NixError)), errors[0])
    return _first_error(first) if isinstance(first, BaseExceptionGroup) else first


def _check_nar_url(info: NarInfo) -> None:
    url = info.url
    if not _NAR_URL_RE.match(url) or url.startswith("/") or ".." in url.split("/"):
        # The URL is not signed: it must never reach outside the cache (file:// especially).
        raise SignatureError(f"{info.store_path}: refusing NAR URL {url[:100]!r}")
