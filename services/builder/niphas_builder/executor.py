"""How a derivation gets realised: the executor interface and the local implementation.

An executor builds one derivation and reports success or failure with the build log. The
local one realises the `.drv` into this node's store; `kubernetes.JobExecutor` runs one Job per
derivation. `pushes` says whether the executor also pushed the closure to the cache (a Job
does, from its node); otherwise the builder pushes from its own store.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from niphas_common.nix.errors import CommandError, CommandTimeout
from niphas_common.nix.runner import NixRunner

from .sandbox import sandbox_unavailable

log = logging.getLogger(__name__)

SANDBOX_REFUSED = (
    "Nix could not set up its build sandbox here; the builder never builds without it "
    "(it needs user or mount namespaces and mounting /proc; see the builder README)"
)


@dataclass(frozen=True)
class BuildJob:
    """One derivation to realise, and what asked for it (for labels and logs)."""

    drv_path: str
    outputs: dict[str, str]
    attribute: str
    repository: str
    commit: str
    locked_flake_ref: str | None = None
    attr_path: str | None = None

    @property
    def drv_hash(self) -> str:
        return self.drv_path.rsplit("/", 1)[-1].split("-", 1)[0]


@dataclass(frozen=True)
class Outcome:
    succeeded: bool
    log: str
    built_on: str
    extra: dict[str, str] = field(default_factory=dict)


LogSink = Callable[[bytes], None]
"""Gets a build's output as it comes (`build_log.LogWriter.feed`)."""


class Executor(Protocol):
    pushes: bool

    async def realise(self, job: BuildJob, log: LogSink | None = None) -> Outcome:
        """Build `job`, handing its output to `log` as it comes; a build failure is an
        Outcome, trouble reaching the machinery is a `TransientError`."""
        ...

    async def cancel(self, job: BuildJob) -> None:
        """Stop `job`'s build for good, after its `realise` call was cancelled (a newer push
        made it pointless)."""
        ...

    async def close(self) -> None: ...


class LocalExecutor:
    """`nix-store --realise` into this node's store: works with every Nix version and puts
    the whole build log on stderr, which becomes the captured log. `runner` must be a
    `sandbox.sandboxed_runner` (sandbox forced, minimal environment)."""

    pushes = False

    def __init__(self, runner: NixRunner, name: str, timeout_s: float) -> None:
        self.runner = runner
        self.name = name
        self.timeout_s = timeout_s

    async def realise(self, job: BuildJob, log: LogSink | None = None) -> Outcome:
        try:
            result = await self.runner.arun(
                "nix-store", "--realise", job.drv_path, timeout=self.timeout_s, on_stderr=log
            )
        except CommandTimeout as exc:
            return Outcome(
                False, f"{exc.stderr}\nbuild timed out after {self.timeout_s} s", self.name
            )
        except CommandError as exc:
            text = exc.stderr or str(exc)
            if sandbox_unavailable(text):
                text += f"\n{SANDBOX_REFUSED}"
            return Outcome(False, text, self.name)
        return Outcome(True, result.stderr, self.name)

    async def cancel(self, job: BuildJob) -> None:
        """Nothing left to do: cancelling `realise` killed nix's process group."""

    async def close(self) -> None:
        pass
