"""The one place that runs the nix CLI.

Every call logs `$ <command>` at INFO (so a log shows exactly what to re-run by hand), has a
timeout after which the whole process group is killed, and fails with a CommandError carrying
the command, exit status and stderr. Output parsers cope with both Nix 2.8 and newer Nix.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import signal
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from niphas_schemas.types import STORE_DIR

from .errors import CommandError, CommandTimeout, HashError, NixError, StorePathError
from .hashes import Hash
from .store_path import StorePath

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 600.0
"""Seconds a nix command may run by default; builds pass their own, longer, timeout."""
KILL_GRACE = 5.0
"""Seconds between SIGTERM and SIGKILL. Nix must get the chance to stop its builders: they
run in their own session (and PID namespace), out of reach of a signal to nix's group."""


@dataclass(frozen=True, slots=True)
class CommandResult:
    cmd: list[str]
    returncode: int
    stdout: bytes
    stderr: str

    @property
    def text(self) -> str:
        return self.stdout.decode()

    def json(self) -> Any:
        try:
            return json.loads(self.stdout)
        except ValueError as exc:
            raise CommandError(
                self.cmd, self.returncode, self.stderr, "output is not JSON"
            ) from exc


@dataclass(frozen=True, slots=True)
class PathInfo:
    """What `nix path-info --json` says about one valid store path."""

    path: StorePath
    nar_hash: Hash
    nar_size: int
    references: tuple[StorePath, ...] = ()
    deriver: StorePath | None = None
    signatures: tuple[str, ...] = ()
    ca: str | None = None


def parse_path_info(data: Any, store_dir: str = STORE_DIR) -> dict[str, PathInfo]:
    """Parse `nix path-info --json` output: a list in Nix 2.8 (entries have `path`, invalid
    ones `valid: false`), an object keyed by path in newer Nix (invalid ones null). Hashes may
    be nix32 (`sha256:...`, 2.8) or SRI (newer). Invalid paths are left out of the result."""
    if isinstance(data, list):
        items = [(entry.get("path"), entry) for entry in data if isinstance(entry, dict)]
    elif isinstance(data, dict):
        items = list(data.items())
    else:
        raise NixError(f"unexpected path-info JSON of type {type(data).__name__}")
    result: dict[str, PathInfo] = {}
    try:
        for path, entry in items:
            if not isinstance(path, str):
                raise NixError("path-info entry without a path")
            if entry is None or entry.get("valid") is False or "narHash" not in entry:
                continue
            deriver = entry.get("deriver")
            result[path] = PathInfo(
                path=StorePath.parse(path, store_dir),
                nar_hash=Hash.parse(entry["narHash"]),
                nar_size=int(entry["narSize"]),
                references=tuple(
                    StorePath.parse(r, store_dir) for r in entry.get("references") or ()
                ),
                deriver=StorePath.parse(deriver, store_dir) if deriver else None,
                signatures=tuple(entry.get("signatures") or ()),
                ca=entry.get("ca") or None,
            )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, HashError | StorePathError):
            raise
        raise NixError(f"unexpected path-info JSON: {exc!r}") from exc
    return result


@dataclass
class NixRunner:
    """Runs nix commands against one store.

    `store` is passed as `--store` (e.g. a chroot store dir for a simulated node); `options`
    become `--option NAME VALUE` pairs on every command. `env` is added to this process's
    environment, or, with `inherit_env=False`, is the whole environment (for nix processes
    that run untrusted builds and must not see this process's secrets).
    """

    store: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    options: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, str] | None = None
    inherit_env: bool = True

    def command(self, program: str, *args: str) -> list[str]:
        """The full argv for `program args...` with this runner's store and options."""
        cmd = [program]
        if self.store is not None:
            cmd += ["--store", self.store]
        for name, value in self.options.items():
            cmd += ["--option", name, value]
        return [*cmd, *args]

    def _env(self) -> dict[str, str] | None:
        if not self.inherit_env:
            return dict(self.env or {})
        return None if self.env is None else {**os.environ, **self.env}

    def _announce(
        self, program: str, args: tuple[str, ...], timeout: float | None
    ) -> tuple[list[str], float | None]:
        """The full command line (logged as `$ cmd`, the one log of every nix call) and its
        time limit."""
        cmd = self.command(program, *args)
        log.info("$ %s", shlex.join(cmd))
        return cmd, timeout or self.timeout

    def run(
        self,
        program: str,
        *args: str,
        input: bytes | None = None,
        stdout: IO[bytes] | int | None = None,
        timeout: float | None = None,
        check: bool = True,
    ) -> CommandResult:
        """Run synchronously. `stdout` may redirect output (e.g. a NAR dump) to a file."""
        cmd, limit = self._announce(program, args, timeout)
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout is None else stdout,
                stderr=subprocess.PIPE,
                env=self._env(),
                start_new_session=True,  # so a timeout can kill nix and its children together
            )
        except OSError as exc:
            raise CommandError(cmd, None, "", f"cannot start: {exc}") from exc
        try:
            out, err = proc.communicate(input, timeout=limit)
        except subprocess.TimeoutExpired:
            err = _stop_sync(proc)
            raise CommandTimeout(
                cmd, None, err.decode(errors="replace"), f"timed out after {limit} s"
            ) from None
        except BaseException:
            _stop_sync(proc)
            raise
        return _result(cmd, proc.returncode, out or b"", err, check)

    async def arun(
        self,
        program: str,
        *args: str,
        input: bytes | None = None,
        # Not asyncio.timeout(): expiry must kill the process group and say which command.
        timeout: float | None = None,  # noqa: ASYNC109
        check: bool = True,
        on_stderr: Callable[[bytes], None] | None = None,
    ) -> CommandResult:
        """Run without blocking the event loop; cancellation kills the command. `on_stderr`
        gets stderr as it comes (a build log followed live); the result still holds it all."""
        cmd, limit = self._announce(program, args, timeout)
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self._env(),
                start_new_session=True,
            )
        except OSError as exc:
            raise CommandError(cmd, None, "", f"cannot start: {exc}") from exc
        exchange = (
            proc.communicate(input) if on_stderr is None else _streamed(proc, input, on_stderr)
        )
        try:
            out, err = await asyncio.wait_for(exchange, limit)
        except TimeoutError:
            await _stop_async(proc)
            raise CommandTimeout(cmd, None, "", f"timed out after {limit} s") from None
        except BaseException:
            # Cancelled: still stop nix (shielded, so the cleanup itself is not cancelled).
            await asyncio.shield(_stop_async(proc))
            raise
        assert proc.returncode is not None
        return _result(cmd, proc.returncode, out, err, check)

    # -- typed helpers ----------------------------------------------------------------------

    def path_info(
        self, paths: Iterable[str | StorePath], recursive: bool = False
    ) -> dict[str, PathInfo]:
        """Path info of valid `paths` (and their closure with `recursive`)."""
        return parse_path_info(self.run("nix", *_path_info_args(paths, recursive)).json())

    async def apath_info(
        self, paths: Iterable[str | StorePath], recursive: bool = False
    ) -> dict[str, PathInfo]:
        result = await self.arun("nix", *_path_info_args(paths, recursive))
        return parse_path_info(result.json())

    def add_to_store(self, path: str | os.PathLike[str]) -> StorePath:
        """`nix-store --add`: copy a file or directory into the store."""
        out = self.run("nix-store", "--add", os.fspath(path)).text.strip()
        return StorePath.parse(out)

    def add_root(self, path: str | StorePath, root: str | os.PathLike[str]) -> None:
        """Register `root` (a symlink to `path`) as an indirect GC root."""
        self.run("nix-store", "--add-root", os.fspath(root), "--realise", str(path))

    def delete(self, paths: Sequence[str | StorePath], check: bool = True) -> CommandResult:
        """`nix-store --delete` (refuses paths that are still alive)."""
        return self.run("nix-store", "--delete", *map(str, paths), check=check)

    def copy(self, paths: Iterable[str | StorePath], to: str = "", src: str = "") -> None:
        """`nix copy` to (`--to URL`) or from (`--from URL`) another store or binary cache."""
        self.run("nix", "copy", *_copy_args(paths, to, src))

    async def acopy(self, paths: Iterable[str | StorePath], to: str = "", src: str = "") -> None:
        await self.arun("nix", "copy", *_copy_args(paths, to, src))

    async def abuild(
        self,
        installables: Sequence[str],
        timeout: float | None = None,  # noqa: ASYNC109 (see arun)
    ) -> Any:
        """`nix build --json --no-link`: the parsed JSON (a list of {drvPath, outputs})."""
        result = await self.arun(
            "nix", "build", "--json", "--no-link", *installables, timeout=timeout
        )
        return result.json()

    def build(self, installables: Sequence[str], timeout: float | None = None) -> Any:
        return self.run(
            "nix", "build", "--json", "--no-link", *installables, timeout=timeout
        ).json()


async def _streamed(
    proc: asyncio.subprocess.Process, input: bytes | None, on_stderr: Callable[[bytes], None]
) -> tuple[bytes, bytes]:
    """`communicate`, with each piece of stderr handed to `on_stderr` as it arrives."""
    assert proc.stdout is not None
    assert proc.stderr is not None
    stderr = proc.stderr

    async def feed() -> None:
        if input is not None and proc.stdin is not None:
            proc.stdin.write(input)
            await proc.stdin.drain()
            proc.stdin.close()

    async def pump() -> bytes:
        pieces = []
        while piece := await stderr.read(65536):
            pieces.append(piece)
            on_stderr(piece)
        return b"".join(pieces)

    _, out, err = await asyncio.gather(feed(), proc.stdout.read(), pump())
    await proc.wait()
    return out, err


def _path_info_args(paths: Iterable[str | StorePath], recursive: bool) -> list[str]:
    args = ["path-info", "--json", *(["--recursive"] if recursive else [])]
    return [*args, *map(str, paths)]


def _copy_args(paths: Iterable[str | StorePath], to: str, src: str) -> list[str]:
    args = [*(["--to", to] if to else []), *(["--from", src] if src else [])]
    return [*args, *map(str, paths)]


def _result(cmd: list[str], returncode: int, out: bytes, err: bytes, check: bool) -> CommandResult:
    stderr = err.decode(errors="replace")
    if check and returncode != 0:
        raise CommandError(cmd, returncode, stderr)
    return CommandResult(cmd, returncode, out, stderr)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _stop_sync(proc: subprocess.Popen[bytes]) -> bytes:
    """SIGTERM, a grace period for nix to stop its builders, then SIGKILL; return stderr."""
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=KILL_GRACE)
    except subprocess.TimeoutExpired:
        _signal_group(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
    return err or b""


async def _stop_async(proc: asyncio.subprocess.Process) -> None:
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), KILL_GRACE)
    except TimeoutError:
        _signal_group(proc.pid, signal.SIGKILL)
        await proc.wait()
