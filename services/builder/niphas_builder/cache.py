"""The binary cache as the builder sees it: what it already holds, and pushing a closure to it.

Pushing is `nix copy --to <cache>?compression=...&secret-key=...`. For a `file://` (or any
binary-cache) store Nix writes each path's NAR before its narinfo, each file through a temp
file and a rename, and copies a closure in dependency order: a narinfo therefore only appears
once its NAR and every path it references are complete, so a builder killed mid-push leaves
paths that are either absent or whole (tests/niphas_builder/test_crash.py checks the cache after
a SIGKILL). The NAR is never compressed with xz.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

from niphas_common.errors import TransientError
from niphas_common.nix.cache_client import BinaryCacheClient
from niphas_common.nix.errors import CacheError, CommandError, NixError
from niphas_common.nix.narinfo import NarInfo
from niphas_common.nix.runner import NixRunner, PathInfo
from niphas_common.nix.signing import SecretKey, TrustedKeys
from niphas_common.nix.upload_token import UploadTokenError, read_upload_token, write_netrc

from .result import BuildResult, built_outputs, sorted_paths

log = logging.getLogger(__name__)


def load_or_create_key(path: Path, name: str = "niphas-local-1") -> SecretKey:
    """The signing key at `path`; created (mode 0600, `.pub` beside it) when missing, so the
    embedded default signs with a stable key of its own."""
    if path.exists():
        return SecretKey.load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    key = SecretKey.generate(name)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(str(key))
    with contextlib.suppress(FileExistsError):
        os.link(tmp, path)  # another process may have won: then use its key
    tmp.unlink()
    path.with_suffix(".pub").write_text(f"{SecretKey.load(path).public_key}\n")
    log.info("created cache signing key %s", path)
    return SecretKey.load(path)


def with_upload_credentials(
    runner: NixRunner, push_url: str, token_file: Path | None, netrc: Path
) -> NixRunner:
    """`runner` sending the cache's upload token (`upload_token`) when it pushes to an
    http(s) cache. Builds never get it (they run through a runner of their own, sandbox.py)."""
    host = urlsplit(push_url).hostname
    if token_file is None or host is None or not push_url.startswith(("http://", "https://")):
        return runner
    try:
        token = read_upload_token(token_file)
    except UploadTokenError as exc:
        raise ValueError(f"{exc}, or unset NIPHAS_BUILDER_CACHE_TOKEN_FILE") from exc
    write_netrc(netrc, host, token)
    return replace(runner, options={**runner.options, "netrc-file": str(netrc)})


def with_params(url: str, **params: str) -> str:
    """`url` with query parameters added (it may already have some)."""
    query = "&".join(f"{name.replace('_', '-')}={value}" for name, value in params.items())
    return f"{url}{'&' if '?' in url else '?'}{query}"


class BuildCache:
    def __init__(
        self,
        runner: NixRunner,
        *,
        push_url: str,
        read_url: str,
        key_file: Path,
        trusted: TrustedKeys,
        compression: str = "zstd",
    ) -> None:
        if compression not in ("zstd", "none"):
            raise ValueError(f"compression {compression!r}: use zstd or none (xz is far too slow)")
        self.runner = runner
        self.push_url = push_url
        self.read_url = read_url
        self._copy_url = with_params(push_url, compression=compression, secret_key=str(key_file))
        self.client = BinaryCacheClient(read_url, trusted)

    async def close(self) -> None:
        await self.client.close()

    async def lookup(self, outputs: Mapping[str, str]) -> BuildResult | None:
        """A `cached` result when every output, and its closure, is in the cache with a
        trusted signature; None when anything is missing or not trusted."""
        try:
            for path in outputs.values():
                if await self.client.narinfo(path) is None:
                    return None
        except CacheError as exc:
            raise TransientError(f"binary cache {self.read_url} unreachable: {exc}") from exc
        except NixError as exc:
            log.warning("cache entry not usable, rebuilding: %s", exc)
            return None
        try:
            infos: dict[str, NarInfo] = {
                str(p): i for p, i in (await self.client.closure(outputs.values())).items()
            }
        except NixError as exc:
            log.warning("cached closure incomplete, rebuilding: %s", exc)
            return None
        return BuildResult(
            status="cached",
            outputs=built_outputs(outputs, infos),
            closure=sorted_paths(infos),
        )

    async def closure(self, outputs: Mapping[str, str]) -> list[NarInfo]:
        """The verified narinfos of the closure of `outputs` in the cache."""
        try:
            return list((await self.client.closure(outputs.values())).values())
        except CacheError as exc:
            raise TransientError(f"binary cache {self.read_url} unreachable: {exc}") from exc

    async def push(self, paths: Iterable[str]) -> dict[str, PathInfo]:
        """Copy the closure of `paths` into the cache, signed; return its path infos."""
        wanted = list(paths)
        try:
            await self.runner.acopy(wanted, to=self._copy_url)
            return await self.runner.apath_info(wanted, recursive=True)
        except CommandError as exc:
            raise TransientError(f"push to {self.push_url} failed: {exc}") from exc
