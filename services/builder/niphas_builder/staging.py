"""Signing separated from building: where build pods' outputs wait until the builder vouches
for them.

A build pod holds no key. Before its Job starts, the builder pushes the derivation's closure
(the `.drv` files and sources), when its own store has it, to the cache, signed, so the pod
can substitute it, and opens a staging directory for the job. Without it (the eval worker
instantiated the `.drv` in another pod's store), the pod evaluates the locked flake itself.
The pod builds, then uploads with `nix copy --to <staging URL>/<token>` (Nix's HTTP binary
cache store writes with PUT; `staging_server` receives them) the job's derivation closure and
its outputs' closure, unsigned. When the Job has finished, `publish` verifies every upload
(`verify`: the NAR; `provenance`: what vouches for the path), signs it with the cluster key
and copies it to the real cache, derivations and sources first; only then does the builder
publish build.done. Anything that does not check out is refused as a whole, and nothing of
that job is signed.

The token is an HMAC of the derivation's hash under a key derived from the signing key: a
builder restarted in the same pod recomputes it for a Job it adopts, and it is good for that
one derivation only.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

from niphas_common.errors import TransientError
from niphas_common.nix.content_proof import TextSink
from niphas_common.nix.derivation import Derivation
from niphas_common.nix.errors import CacheError, CommandError, NixError
from niphas_common.nix.nar_parser import NarParser
from niphas_common.nix.narinfo import NarInfo
from niphas_common.nix.runner import NixRunner
from niphas_common.nix.signing import SecretKey
from niphas_common.nix.store_path import StorePath

from .cache import BuildCache, with_params
from .executor import BuildJob
from .provenance import derivation_of, vouch
from .verify import (
    UploadRefused,
    check_complete,
    door_problem,
    read_uploads,
    unsigned,
    verify_nar,
)

log = logging.getLogger(__name__)

CACHE_INFO = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n"


class StagingArea:
    def __init__(
        self,
        root: Path,
        key: SecretKey,
        runner: NixRunner,
        cache: BuildCache,
        *,
        base_url: str,
        compression: str,
        key_file: Path,
    ) -> None:
        self.root = root
        self.key = key
        self.runner = runner
        self.cache = cache
        self.base_url = base_url.rstrip("/")
        self._push_url = with_params(
            cache.push_url, compression=compression, secret_key=str(key_file)
        )
        self._token_key = hmac.new(key.key, b"niphas-staging-token", hashlib.sha256).digest()
        self._jobs: dict[str, frozenset[str] | None] = {}
        """Jobs waiting for uploads: drv hash -> the outputs of the derivation closure, when
        the builder read them from its own store (else None: `provenance` walks uploads)."""

    # -- what the server asks ---------------------------------------------------------------

    def token(self, drv_hash: str) -> str:
        return hmac.new(self._token_key, drv_hash.encode(), hashlib.sha256).hexdigest()[:40]

    def url(self, job: BuildJob) -> str:
        """The upload URL without its token (the pod appends `/<token>`)."""
        return f"{self.base_url}/staging/{job.drv_hash}"

    def accepts(self, drv_hash: str, token: str) -> bool:
        """Whether `token` is the one for `drv_hash`, and a build of it is waiting."""
        good = hmac.compare_digest(self.token(drv_hash), token)
        return good and drv_hash in self._jobs

    def known_outputs(self, drv_hash: str) -> frozenset[str] | None:
        return self._jobs.get(drv_hash)

    def door_problem(self, drv_hash: str, info: NarInfo) -> str | None:
        """Why a narinfo is refused at upload already (see `verify.door_problem`)."""
        return door_problem(info, self.known_outputs(drv_hash))

    def directory(self, drv_hash: str) -> Path:
        return self.root / drv_hash

    # -- around one Job ---------------------------------------------------------------------

    async def prepare(self, job: BuildJob) -> None:
        """Make the derivation's closure substitutable from the cache and open the job's
        staging directory (kept as is: a restarted builder adopting a Job keeps its uploads)."""
        outputs: frozenset[str] | None = None
        valid = await self.runner.arun("nix-store", "--check-validity", job.drv_path, check=False)
        have_drv = valid.returncode == 0
        if have_drv:
            try:
                await self.runner.arun(
                    "nix", "copy", "--derivation", "--to", self._push_url, job.drv_path
                )
                outputs = await self._closure_outputs(job.drv_path)
            except CommandError as exc:
                raise TransientError(f"pushing {job.drv_path} to the cache: {exc}") from exc
        else:
            # The pod evaluates the locked flake itself and uploads the derivations too.
            log.info("%s is not in this builder's store; build pods evaluate the flake", job)
        self.directory(job.drv_hash).mkdir(parents=True, exist_ok=True)
        self._jobs[job.drv_hash] = outputs

    async def _closure_outputs(self, drv_path: str) -> frozenset[str]:
        """Every output path of the derivation and of the derivations it depends on."""
        shown = (await self.runner.arun("nix", "show-derivation", "-r", drv_path)).json()
        return frozenset(
            out["path"]
            for drv in shown.values()
            for out in drv.get("outputs", {}).values()
            if out.get("path")
        )

    async def publish(self, job: BuildJob) -> list[str]:
        """Verify the job's uploads, sign them and copy them to the cache (derivations and
        sources, then outputs); return the paths published. Raises UploadRefused (nothing
        signed) when anything does not check out."""
        directory = self.directory(job.drv_hash)
        uploads = read_uploads(directory)
        fresh = {p: u for p, u in uploads.items() if not await self._in_cache(u.info.store_path)}
        texts: dict[str, bytes] = {}
        for path, upload in fresh.items():
            if (text := verify_nar(upload)) is not None:
                texts[path] = text
        known = self.known_outputs(job.drv_hash)
        vouched = await vouch(job.drv_path, fresh, texts, known, self._cached_drv)
        await check_complete(fresh, job.outputs.values(), self._in_cache)
        for upload in fresh.values():
            signed = unsigned(upload.info).signed(self.key)
            (directory / f"{signed.hash_part}.narinfo").write_text(signed.render())
        # References first; --derivation: a .drv stands for itself, not for its outputs.
        for batch, flags in (
            (vouched.sources, ()),
            (vouched.drvs, ("--derivation",)),
            (vouched.outputs, ()),
        ):
            if batch:
                await self._copy(directory, sorted(batch), *flags)
        log.info("verified, signed and pushed %d uploaded paths of %s", len(fresh), job.drv_path)
        return sorted(fresh)

    async def _cached_drv(self, path: StorePath) -> Derivation | None:
        """A `.drv` the cache holds under a trusted signature (checked again by content)."""
        try:
            info = await self.cache.client.narinfo(path)
            if info is None:
                return None
            sink = TextSink()
            parser = NarParser(sink)
            async for piece in self.cache.client.iter_nar(info):
                parser.feed(piece)
            parser.finish()
        except CacheError as exc:
            raise TransientError(f"binary cache unreachable: {exc}") from exc
        except NixError:
            return None  # present but not trusted, or damaged: not a reason to vouch
        return derivation_of(path, sink.text, {str(r) for r in info.references})

    async def _copy(self, directory: Path, paths: Iterable[str], *flags: str) -> None:
        (directory / "nix-cache-info").write_text(CACHE_INFO)
        try:
            # --no-recursive: references already in the cache are not in the staging area.
            await self.runner.arun(
                "nix", "copy", "--no-recursive", "--no-check-sigs", *flags,
                "--from", f"file://{directory}", "--to", self._push_url, *sorted(paths),
            )  # fmt: skip
        except CommandError as exc:
            raise TransientError(f"pushing verified uploads to the cache: {exc}") from exc

    async def _in_cache(self, path: StorePath) -> bool:
        try:
            return await self.cache.client.narinfo(path) is not None
        except CacheError as exc:
            raise TransientError(f"binary cache unreachable: {exc}") from exc
        except NixError:
            return False  # present but not trusted: not a reason to vouch for it

    def discard(self, job: BuildJob) -> None:
        self._jobs.pop(job.drv_hash, None)
        shutil.rmtree(self.directory(job.drv_hash), ignore_errors=True)


__all__ = ["CACHE_INFO", "StagingArea", "UploadRefused"]
