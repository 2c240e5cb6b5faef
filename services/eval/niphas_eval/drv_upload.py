"""Making an evaluation's derivations available to the build pods of a cluster.

A worker evaluates in its own store, so the `.drv` files it instantiated (and the sources they
name: the pushed commit, its locked inputs) exist nowhere else. Without them a build pod
evaluates the locked flake itself, which needs the forge, and for a private repository its
credentials, which a build pod must never hold. So after a successful evaluation the worker
copies the derivation closure of every evaluated attribute to the in-cluster binary cache:

    nix copy --derivation --to '<DRV_UPLOAD_URL>?compression=zstd' <drv>...

Every path of a derivation closure is content-addressed (a `.drv` is a text path of its bytes
and references, a source the path of its NarHash), so a Nix client with `require-sigs` takes
it from a cache without any signature: its content proves it. Nix asks the cache for each
path first, so only what the cache lacks travels.

The cache's upload token (`DRV_UPLOAD_TOKEN_FILE`, the Secret niphas-cache-upload) is read on
each upload, written into a netrc file (0600, in a private directory removed afterwards) and
named with `--option netrc-file`: nix sends it as HTTP basic auth, and only a path appears on
a command line or in a log. The copying nix runs with the minimal environment of nixenv.py.
An upload that fails (cache down, token refused) raises `UploadFailed` with a one-line
reason; the worker logs it and publishes eval.done all the same (build pods then evaluate the
flake themselves, as without the upload).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

from niphas_common.nix.errors import CommandError
from niphas_common.nix.runner import NixRunner
from niphas_common.nix.upload_token import UploadTokenError, read_upload_token, write_netrc
from niphas_eval.evaluator import first_error_line
from niphas_eval.nixenv import nix_environment

log = logging.getLogger(__name__)


class UploadFailed(Exception):
    """The derivations did not reach the cache (the message is one line, without secrets)."""


class DerivationUpload:
    """Copies derivation closures to one binary cache with its upload token."""

    def __init__(
        self,
        runner: NixRunner,
        url: str,
        token_file: Path | None,
        *,
        work_dir: Path,
        timeout_s: float,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"derivation upload URL {url!r}: expected http(s)://HOST[:PORT]")
        self.url = url.rstrip("/")
        self.host = parts.hostname
        self.token_file = token_file
        self.work_dir = work_dir
        self.timeout_s = timeout_s
        env = {**nix_environment(work_dir / "home"), **(runner.env or {})}
        self._runner = dataclasses.replace(runner, env=env, inherit_env=False)

    def __repr__(self) -> str:
        return f"DerivationUpload({self.url!r})"

    async def upload(self, drv_paths: Iterable[str]) -> None:
        """Copy the derivation closures of `drv_paths` to the cache, or raise UploadFailed."""
        paths = sorted(set(drv_paths))
        if not paths:
            return
        token = self._token()
        with self._netrc(token) as netrc:
            runner = self._runner
            if netrc is not None:
                runner = dataclasses.replace(
                    runner, options={**runner.options, "netrc-file": str(netrc)}
                )
            try:
                await runner.arun(
                    "nix", "copy", "--derivation", "--to", f"{self.url}?compression=zstd",
                    *paths, timeout=self.timeout_s,
                )  # fmt: skip
            except CommandError as exc:
                reason = first_error_line(exc.stderr) if exc.stderr.strip() else str(exc)
                if token:
                    reason = reason.replace(token, "<token>")
                raise UploadFailed(
                    f"copying {len(paths)} derivations to {self.url}: {reason}"
                ) from None

    def _token(self) -> str | None:
        """The upload token, read now (a rotated Secret applies at once); None without one."""
        if self.token_file is None:
            return None
        try:
            return read_upload_token(self.token_file)
        except UploadTokenError as exc:
            raise UploadFailed(str(exc)) from None

    @contextlib.contextmanager
    def _netrc(self, token: str | None) -> Iterator[Path | None]:
        """A netrc naming the token for the cache's host, removed when the block ends."""
        if token is None:
            yield None
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        private = Path(tempfile.mkdtemp(prefix="cache-upload-", dir=self.work_dir))
        try:
            netrc = private / "netrc"
            write_netrc(netrc, self.host, token)
            yield netrc
        finally:
            shutil.rmtree(private, ignore_errors=True)
