"""Evaluating a flake at one commit with the real `nix`.

One `nix eval` per commit. A small wrapper flake (written once per worker, the same content
every time) takes the target as its input `target`, replaced on each call with
`--override-input target git+<url>?ref=<ref>&rev=<commit>`, and returns, for every attribute
of `packages.<system>` and of an optional `niphas` output (`niphas.<system>` when it has the
system, else `niphas` itself): drvPath, output paths, name, system and meta.mainProgram, plus
the target's locked rev and narHash. Evaluation stays pure (no `--impure`): the pushed code
cannot read the worker's environment or files. The target's own flake.lock is used; a missing
or stale one is completed in memory (`--no-write-lock-file`), as `nix build` would.

An attribute that throws or fails an assertion fails alone (`builtins.tryEval`); its error
message is then fetched with one more `nix eval` for the first few such attributes. Other
errors (syntax, a missing attribute, a type error) fail the whole evaluation with nix's
stderr tail. Each `nix eval` runs under `prlimit --as` (an address-space limit, no cgroup
needed: Nix's GC then reports `out of memory`) and a timeout (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from niphas_common.errors import TransientError
from niphas_common.nix.errors import CommandError, CommandTimeout
from niphas_common.nix.runner import NixRunner
from niphas_eval.flakeref import flake_ref, git_url
from niphas_schemas import EvaluatedAttribute

log = logging.getLogger(__name__)

MAX_DETAILED_ERRORS = 3
"""Failed attributes whose own error message is fetched with an extra `nix eval`."""

_WRAPPER = """\
{
  description = "niphas eval: what one commit of a flake provides for @SYSTEM@";
  # Always replaced: nix eval --override-input target <flake ref pinned to a commit>.
  inputs.target.url = "path:/var/empty";
  outputs = { self, target }:
    let
      system = "@SYSTEM@";
      strict = x: builtins.tryEval (builtins.deepSeq x x);
      failed = "evaluation failed (throw or assert)";
      describe = prefix: name: value:
        let
          base = { attribute = name; attrPath = "${prefix}.${name}"; };
          forced = builtins.tryEval value;
          v = forced.value;
          isDrv = forced.success && builtins.isAttrs v && (v.type or null) == "derivation";
          drvPath = strict v.drvPath;
          outputs = strict (builtins.listToAttrs
            (map (o: { name = o; value = v.${o}.outPath; }) (v.outputs or [ "out" ])));
          drvName = strict (v.name or null);
          drvSystem = strict (v.system or null);
          main = strict (v.meta.mainProgram or null);
        in
          if !forced.success then base // { error = failed; }
          else if !isDrv then base // { error = "not a derivation"; }
          else if !(drvPath.success && outputs.success) then base // { error = failed; }
          else base // {
            drvPath = drvPath.value;
            outputs = outputs.value;
            name = if drvName.success then drvName.value else null;
            system = if drvSystem.success then drvSystem.value else null;
            mainProgram =
              if main.success && builtins.isString main.value then main.value else null;
          };
      describeAll = prefix: set:
        map (name: describe prefix name set.${name}) (builtins.attrNames set);
      packages = target.packages or { };
      hasPackages = builtins.isAttrs packages && packages ? ${system}
        && builtins.isAttrs packages.${system};
      niphas = target.niphas or null;
      hasNiphas = builtins.isAttrs niphas;
      perSystem = hasNiphas && niphas ? ${system} && builtins.isAttrs niphas.${system};
    in {
      result = {
        rev = target.rev or null;
        narHash = target.narHash or null;
        inherit hasPackages hasNiphas;
        attributes =
          (if hasPackages then describeAll "packages.${system}" packages.${system} else [ ])
          ++ (if perSystem then describeAll "niphas.${system}" niphas.${system}
              else if hasNiphas then describeAll "niphas" niphas
              else [ ]);
      };
    };
}
"""

_NETWORK_ERRORS = re.compile(
    r"Could not resolve host|Connection refused|Connection timed out|Network is unreachable|"
    r"unable to access|Could not read from remote repository|unable to download",
    re.IGNORECASE,
)
_OUT_OF_MEMORY = re.compile(r"out of memory|std::bad_alloc|Failed to expand heap", re.IGNORECASE)
_LOCK_NOISE = re.compile(r"^(warning: not writing modified lock file|• (Added|Updated) input)")


class EvalTransient(TransientError):
    """The repository could not be reached: worth another delivery."""


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
    ) -> None:
        self._runner = runner
        # Wrappers (prlimit, git) take their argv from us, not the runner's --store/--option.
        env = {**(runner.env or {}), "GIT_TERMINAL_PROMPT": "0"}
        self._bare = dataclasses.replace(runner, store=None, options={}, env=env)
        self.system = system
        self.timeout_s = timeout_s
        self.memory_limit_mb = memory_limit_mb
        self.stderr_tail_bytes = stderr_tail_bytes
        self.git_timeout_s = git_timeout_s
        self._prlimit = shutil.which("prlimit") if memory_limit_mb > 0 else None
        if memory_limit_mb > 0 and self._prlimit is None:
            log.warning("prlimit not found: evaluations run without a memory limit")
        self.wrapper_dir = work_dir / f"eval-flake-{system}"
        self.wrapper_dir.mkdir(parents=True, exist_ok=True)
        flake = self.wrapper_dir / "flake.nix"
        text = _WRAPPER.replace("@SYSTEM@", system)
        if not flake.exists() or flake.read_text() != text:
            flake.write_text(text)

    # -- commands --------------------------------------------------------------------------

    def nix_argv(self, *args: str) -> list[str]:
        argv = self._runner.command("nix", *args)
        if self._prlimit is not None:
            argv = [self._prlimit, f"--as={self.memory_limit_mb * 1024 * 1024}", "--", *argv]
        return argv

    def eval_args(self, pinned: str) -> list[str]:
        return [
            "eval", "--json", "--no-write-lock-file",
            "--override-input", "target", pinned,
            f"path:{self.wrapper_dir}#result",
        ]  # fmt: skip

    # -- resolving a ref -------------------------------------------------------------------

    async def resolve(self, repository: str, ref: str | None) -> tuple[str, str | None]:
        """The commit `ref` (default: the remote's HEAD) points at now, and the ref's full
        name (HEAD's target branch when `ref` is None)."""
        wanted = ref or "HEAD"
        try:
            result = await self._bare.arun(
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
        argv = self.nix_argv(*self.eval_args(pinned))
        started = time.monotonic()
        try:
            result = await self._bare.arun(argv[0], *argv[1:], timeout=self.timeout_s)
        except CommandTimeout:
            return Evaluation(
                "failed", commit,
                error=f"evaluation timed out after {self.timeout_s:g} s "
                "(NIPHAS_EVAL_EVAL_TIMEOUT_S)",
                duration_s=time.monotonic() - started, reason="timeout",
            )  # fmt: skip
        except CommandError as exc:
            return self._failure(repository, commit, exc, time.monotonic() - started)
        duration = time.monotonic() - started
        data = result.json()
        attributes = [self._attribute(entry) for entry in data.get("attributes") or []]
        failed = [a for a in attributes if a.error is not None]
        if failed:
            attributes = await self._explain(pinned, attributes)
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
        stderr = exc.stderr
        if _NETWORK_ERRORS.search(stderr):
            raise EvalTransient(f"cannot fetch {repository}: {first_error_line(stderr)}")
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
        self, pinned: str, attributes: list[EvaluatedAttribute]
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
                "eval", "--raw", "--no-write-lock-file", f"{pinned}#{attr.attr_path}.drvPath"
            )
            try:
                await self._bare.arun(argv[0], *argv[1:], timeout=self.timeout_s)
            except CommandError as exc:
                detail = tail(exc.stderr, min(2000, self.stderr_tail_bytes))
                explained.append(attr.model_copy(update={"error": detail or attr.error}))
            else:
                explained.append(attr)
        return explained
