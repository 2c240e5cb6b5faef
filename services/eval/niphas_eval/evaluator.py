"""Evaluating a flake at one commit with the real `nix`.

Two `nix eval`s per commit, both pure, under the options and minimal environment of
nixenv.py (no import-from-derivation by default, `restrict-eval` with `allowed-uris` from the
allowlist, none of the worker's credentials in nix's environment):
1. `source`: `builtins.fetchTree` of the pushed commit (an allowlisted repository) returns its
   narHash and its committed flake.lock; every input of that lock is checked against the
   allowlist (flakelock.py). A refused input is a failed result naming it.
2. the wrapper flake (wrapper.py), written for this commit with a flake.lock holding the
   checked inputs, evaluated with `--no-update-lock-file`: Nix fetches nothing the lock does
   not name (an input missing from the committed flake.lock is never fetched).

An attribute that throws or fails an assertion fails alone (`builtins.tryEval`); its error
message is then fetched with one more `nix eval` for the first few such attributes. Other
errors (syntax, a missing attribute, a type error, import-from-derivation, a forbidden fetch)
fail the whole evaluation with a first line saying why and nix's stderr tail (bounded by
STDERR_TAIL_BYTES). Each `nix eval` runs under `prlimit --as` (an address-space limit, no
cgroup needed: Nix's GC then reports `out of memory`) and a timeout (SIGTERM, then SIGKILL).
Private repositories: `git ls-remote` and each `nix eval` get the git credentials of exactly
the repositories they fetch (the pushed one; then it and the inputs of its lock) through
credentials.py, as paths in their environment, never in an argument, a log or an event.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from niphas_common.errors import TransientError
from niphas_common.nix.errors import CommandError, CommandTimeout
from niphas_common.nix.runner import NixRunner
from niphas_eval.credentials import GitCredentials
from niphas_eval.flakelock import (
    InputRefused,
    check_nodes,
    input_urls,
    parse_lock,
    target_of,
    wrapper_lock,
)
from niphas_eval.flakeref import Allowlist, flake_ref, git_url
from niphas_eval.nixenv import eval_options, nix_environment
from niphas_eval.wrapper import WrapperDir, nix_string
from niphas_schemas import EvaluatedAttribute

log = logging.getLogger(__name__)

MAX_DETAILED_ERRORS = 3
"""Failed attributes whose own error message is fetched with an extra `nix eval`."""


_NETWORK_ERRORS = re.compile(
    r"Could not resolve host|Connection refused|Connection timed out|Network is unreachable|"
    r"unable to access|Could not read from remote repository|unable to download|"
    r"could not read Username|Authentication failed|Permission denied \(publickey|"
    r"Host key verification failed",
    re.IGNORECASE,
)
_OUT_OF_MEMORY = re.compile(r"out of memory|std::bad_alloc|Failed to expand heap", re.IGNORECASE)
_LOCK_NOISE = re.compile(r"^(warning: not writing modified lock file|• (Added|Updated) input)")
_HINTS = (
    (
        re.compile(r"because the option 'allow-import-from-derivation' is disabled"),
        "import-from-derivation is disabled: evaluation may not build "
        "(NIPHAS_EVAL_ALLOW_IMPORT_FROM_DERIVATION)",
        "import-from-derivation",
    ),
    (
        re.compile(r"is forbidden in restricted mode|forbidden in pure eval"),
        "evaluation may read only the flake's own sources and locked inputs, and fetch only "
        "from NIPHAS_EVAL_ALLOWED_REFS",
        "forbidden-access",
    ),
    (
        re.compile(r"called without required argument"),
        "an input of flake.nix is missing from the committed flake.lock (inputs come only "
        "from flake.lock: run `nix flake lock` and commit it)",
        "unlocked-input",
    ),
)
"""(stderr pattern, first line of the failed result, metrics reason) for failures that the
hardening causes, so the author reads why rather than guessing from nix's words."""
_SOURCE = """\
let
  src = builtins.fetchTree @PINNED@;
  lock = src + "/flake.lock";
in {
  inherit (src) narHash;
  lastModified = src.lastModified or null;
  revCount = src.revCount or null;
  lock = if builtins.pathExists lock then builtins.readFile lock else null;
}
"""
"""Fetches the pushed commit (only it: no input of it) and reads its committed flake.lock."""


class _TimedOut(CommandError):
    """A hardened nix command ran past EVAL_TIMEOUT_S (its stderr is not kept)."""


class EvalTransient(TransientError):
    """The repository could not be reached, or refused our credentials: worth another
    delivery (and, after the last, a failed eval.done that is not kept as the commit's)."""


class ResolveError(Exception):
    """The ref does not exist in the repository (retrying cannot help)."""


@dataclass(frozen=True)
class Evaluation:
    status: Literal["succeeded", "failed"]
    commit: str
    locked_flake_ref: str | None = None
    attributes: tuple[EvaluatedAttribute, ...] = ()
    error: str | None = None
    duration_s: float = 0.0
    reason: str = "ok"
    """A short class of the outcome for metrics: ok, eval-error, timeout, out-of-memory."""


def tail(text: str, limit: int) -> str:
    """The end of nix's stderr without the lock-file chatter about our wrapper flake."""
    kept: list[str] = []
    skipping = False
    for line in text.splitlines():
        if _LOCK_NOISE.match(line.strip()):
            skipping = True
            continue
        if skipping and line.startswith("    "):
            continue
        skipping = False
        kept.append(line)
    cleaned = "\n".join(kept).strip()
    data = cleaned.encode()
    if len(data) <= limit:
        return cleaned
    return "..." + data[-limit:].decode(errors="ignore")


def first_error_line(stderr: str) -> str:
    for line in stderr.splitlines():
        if line.strip().startswith("error:"):
            return line.strip()[:500]
    return stderr.strip().splitlines()[-1][:500] if stderr.strip() else "no output"


class Evaluator:
    def __init__(
        self,
        runner: NixRunner,
        *,
        system: str,
        work_dir: Path,
        timeout_s: float,
        memory_limit_mb: int,
        stderr_tail_bytes: int,
        git_timeout_s: float = 60.0,
        allowlist: Allowlist | None = None,
        allow_import_from_derivation: bool = False,
        credentials: GitCredentials | None = None,
    ) -> None:
        self._runner = runner
        self._credentials = credentials or GitCredentials(None)
        self.allowlist = allowlist or Allowlist(())
        self.allow_ifd = allow_import_from_derivation
        self.work_dir = work_dir
        # The whole environment of nix, git and prlimit: nothing of ours (see nixenv.py).
        # Wrappers take their argv from us, not the runner's --store/--option.
        env = {**nix_environment(work_dir / "home"), **(runner.env or {})}
        self._bare = dataclasses.replace(runner, store=None, options={}, env=env, inherit_env=False)
        self.system = system
        self.timeout_s = timeout_s
        self.memory_limit_mb = memory_limit_mb
        self.stderr_tail_bytes = stderr_tail_bytes
        self.git_timeout_s = git_timeout_s
        self._prlimit = shutil.which("prlimit") if memory_limit_mb > 0 else None
        if memory_limit_mb > 0 and self._prlimit is None:
            log.warning("prlimit not found: evaluations run without a memory limit")

    # -- commands --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _fetching(self, urls: Iterable[str]) -> Iterator[NixRunner]:
        """The bare runner, with the git credentials of `urls` while the block runs."""
        with self._credentials.git_environment(urls, self.work_dir / "credentials") as extra:
            if not extra:
                yield self._bare
            else:
                yield dataclasses.replace(self._bare, env={**(self._bare.env or {}), **extra})

    def nix_argv(self, *args: str, extra_uris: Sequence[str] = ()) -> list[str]:
        options = eval_options(
            [*self.allowlist.uri_prefixes(), *extra_uris], allow_ifd=self.allow_ifd
        )
        hardened = [a for name, value in options.items() for a in ("--option", name, value)]
        argv = self._runner.command("nix", *hardened, *args)
        if self._prlimit is not None:
            argv = [self._prlimit, f"--as={self.memory_limit_mb * 1024 * 1024}", "--", *argv]
        return argv

    # -- resolving a ref -------------------------------------------------------------------

    async def resolve(self, repository: str, ref: str | None) -> tuple[str, str | None]:
        """The commit `ref` (default: the remote's HEAD) points at now, and the ref's full
        name (HEAD's target branch when `ref` is None)."""
        wanted = ref or "HEAD"
        try:
            with self._fetching([repository]) as runner:
                result = await runner.arun(
                    "git", "ls-remote", "--symref", git_url(repository), wanted,
                    timeout=self.git_timeout_s,
                )  # fmt: skip
        except CommandError as exc:
            raise EvalTransient(
                f"git ls-remote {repository} failed: {first_error_line(exc.stderr)}"
            ) from exc
        symref: str | None = None
        found: dict[str, str] = {}
        for line in result.text.splitlines():
            left, _, name = line.partition("\t")
            if left.startswith("ref: "):
                symref = left[5:].strip()
            elif name:
                found[name.strip()] = left.strip()
        commit = found.get(f"{wanted}^{{}}") or found.get(wanted)  # peeled tag first
        if commit is None:
            raise ResolveError(f"{repository} has no ref {wanted}")
        return commit, (ref if ref is not None else symref)

    # -- evaluating ------------------------------------------------------------------------

    async def evaluate(self, repository: str, commit: str, ref: str | None) -> Evaluation:
        pinned = flake_ref(repository, rev=commit, ref=ref)
        started = time.monotonic()
        try:
            with self._fetching([repository]) as runner:
                source = await self._nix_json(runner, ["eval", "--json", "--expr",
                    _SOURCE.replace("@PINNED@", nix_string(pinned))])  # fmt: skip
            lock = parse_lock(source.get("lock"))
            forge_refs = check_nodes(lock, self.allowlist)
        except InputRefused as exc:
            return Evaluation(
                "failed", commit, error=f"flake input refused: {exc}",
                duration_s=time.monotonic() - started, reason="disallowed-input",
            )  # fmt: skip
        except CommandError as exc:
            return self._failure(repository, commit, exc, time.monotonic() - started)
        wrapper_lock_ = wrapper_lock(target_of(pinned, source), lock)
        with (
            WrapperDir(self.work_dir, self.system, pinned, wrapper_lock_) as wrapper,
            self._fetching([repository, *input_urls(lock)]) as runner,
        ):
            try:
                data = await self._nix_json(
                    runner,
                    ["eval", "--json", "--no-update-lock-file", f"{wrapper.ref}#result"],
                    forge_refs,
                )
            except CommandError as exc:
                return self._failure(repository, commit, exc, time.monotonic() - started)
            attributes = [self._attribute(entry) for entry in data.get("attributes") or []]
            if any(a.error is not None for a in attributes):
                attributes = await self._explain(runner, wrapper.ref, attributes, forge_refs)
        return self._outcome(repository, commit, ref, data, attributes, started)

    async def _nix_json(
        self, runner: NixRunner, args: list[str], extra_uris: Sequence[str] = ()
    ) -> Any:
        """`nix <args>` hardened, under the timeout; its JSON output."""
        argv = self.nix_argv(*args, extra_uris=extra_uris)
        try:
            result = await runner.arun(argv[0], *argv[1:], timeout=self.timeout_s)
        except CommandTimeout as exc:
            raise _TimedOut(exc.cmd, None, "") from None
        return result.json()

    def _outcome(
        self,
        repository: str,
        commit: str,
        ref: str | None,
        data: dict[str, Any],
        attributes: list[EvaluatedAttribute],
        started: float,
    ) -> Evaluation:
        duration = time.monotonic() - started
        failed = [a for a in attributes if a.error is not None]
        nar_hash = data.get("narHash")
        locked = flake_ref(
            repository, rev=data.get("rev") or commit, ref=ref,
            nar_hash=nar_hash if isinstance(nar_hash, str) else None,
        )  # fmt: skip
        if not data.get("hasPackages") and not data.get("hasNiphas"):
            return Evaluation(
                "failed", commit, locked,
                error=f"the flake has no packages.{self.system} and no niphas output",
                duration_s=duration, reason="eval-error",
            )  # fmt: skip
        if attributes and len(failed) == len(attributes):
            return Evaluation(
                "failed", commit, locked, tuple(attributes),
                error=f"every attribute failed to evaluate ({len(failed)})",
                duration_s=duration, reason="eval-error",
            )  # fmt: skip
        return Evaluation("succeeded", commit, locked, tuple(attributes), duration_s=duration)

    def _failure(
        self, repository: str, commit: str, exc: CommandError, duration: float
    ) -> Evaluation:
        if isinstance(exc, _TimedOut):
            return Evaluation(
                "failed", commit,
                error=f"evaluation timed out after {self.timeout_s:g} s "
                "(NIPHAS_EVAL_EVAL_TIMEOUT_S)",
                duration_s=duration, reason="timeout",
            )  # fmt: skip
        stderr = exc.stderr
        if _NETWORK_ERRORS.search(stderr):
            fatal = [ln.strip() for ln in stderr.splitlines() if ln.strip().startswith("fatal:")]
            cause = fatal[0][:500] if fatal else first_error_line(stderr)  # git's own words
            raise EvalTransient(f"cannot fetch {repository}: {cause}")
        kept = tail(stderr, self.stderr_tail_bytes)
        if _OUT_OF_MEMORY.search(stderr) or (exc.returncode is not None and exc.returncode < 0):
            summary = (
                f"evaluation ran out of memory (limit {self.memory_limit_mb} MiB, "
                "NIPHAS_EVAL_MEMORY_LIMIT_MB)"
                if self._prlimit is not None
                else f"nix eval was killed (exit status {exc.returncode})"
            )
            return Evaluation(
                "failed", commit, error=f"{summary}\n{kept}", duration_s=duration,
                reason="out-of-memory",
            )  # fmt: skip
        for pattern, summary, reason in _HINTS:
            if pattern.search(stderr):
                return Evaluation(
                    "failed", commit, error=f"{summary}\n{kept}", duration_s=duration,
                    reason=reason,
                )  # fmt: skip
        return Evaluation(
            "failed", commit, error=f"{first_error_line(kept)}\n{kept}", duration_s=duration,
            reason="eval-error",
        )  # fmt: skip

    def _attribute(self, entry: dict[str, Any]) -> EvaluatedAttribute:
        name = str(entry.get("attribute"))
        attr_path = str(entry.get("attrPath"))[:1024]
        error = entry.get("error")
        if error is None:
            try:
                return EvaluatedAttribute(
                    attribute=name,
                    attr_path=attr_path,
                    name=entry.get("name"),
                    system=entry.get("system") or self.system,
                    drv_path=entry.get("drvPath"),
                    outputs=entry.get("outputs") or {},
                    main_program=entry.get("mainProgram"),
                )
            except ValidationError as exc:
                error = f"unusable result: {exc.errors()[0]['msg']}"
        return EvaluatedAttribute(
            attribute=name, attr_path=attr_path, system=self.system, error=str(error)[:65536]
        )

    async def _explain(
        self,
        runner: NixRunner,
        wrapper: str,
        attributes: list[EvaluatedAttribute],
        extra_uris: Sequence[str],
    ) -> list[EvaluatedAttribute]:
        """Replace the generic tryEval error of the first few failures with nix's message."""
        explained: list[EvaluatedAttribute] = []
        budget = MAX_DETAILED_ERRORS
        for attr in attributes:
            if attr.error is None or attr.error == "not a derivation" or budget == 0:
                explained.append(attr)
                continue
            budget -= 1
            argv = self.nix_argv(
                "eval", "--raw", "--no-update-lock-file",
                f"{wrapper}#target.{attr.attr_path}.drvPath", extra_uris=extra_uris,
            )  # fmt: skip
            try:
                await runner.arun(argv[0], *argv[1:], timeout=self.timeout_s)
            except CommandError as exc:
                detail = tail(exc.stderr, min(2000, self.stderr_tail_bytes))
                explained.append(attr.model_copy(update={"error": detail or attr.error}))
            else:
                explained.append(attr)
        return explained
