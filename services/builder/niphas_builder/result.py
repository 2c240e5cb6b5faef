"""What one derivation's build came to, independent of which event asked for it.

A result is shared: the lease record in the KV carries it to builders that waited for the same
derivation, and each turns it into the `build.done` of its own evaluation (`cached` when the
build was made for another one).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict

from niphas_common.nix.narinfo import NarInfo
from niphas_common.nix.runner import PathInfo
from niphas_schemas import BuildDone, BuiltOutput, EvalDone, EvaluatedAttribute

MAX_LOG_TAIL = 16 * 1024
"""Characters of log kept in an event: enough to see the error, small enough for NATS."""


class BuildResult(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    status: Literal["built", "cached", "failed"]
    outputs: tuple[BuiltOutput, ...] = ()
    closure: tuple[str, ...] = ()
    built_on: str | None = None
    duration_s: float = 0.0
    log_tail: str | None = None

    @classmethod
    def failed(cls, log: str, built_on: str | None, duration_s: float = 0.0) -> BuildResult:
        return cls(
            status="failed",
            log_tail=log or "(no log)",
            built_on=built_on,
            duration_s=duration_s,
        )

    def reused(self) -> BuildResult:
        """This result as another evaluation of the derivation sees it: what was built is
        cached by now (a failure stays a failure)."""
        if self.status != "built":
            return self
        return self.model_copy(update={"status": "cached", "duration_s": 0.0})

    def to_event(self, event: EvalDone, attr: EvaluatedAttribute, cache_url: str) -> BuildDone:
        assert attr.drv_path is not None
        return BuildDone(
            eval_event_id=event.event_id,
            repository=event.repository,
            ref=event.ref,
            commit=event.commit,
            pushed_at=event.pushed_at,
            attribute=attr.attribute,
            drv_path=attr.drv_path,
            status=self.status,
            outputs=self.outputs,
            closure=self.closure,
            cache_url=None if self.status == "failed" else cache_url,
            built_on=self.built_on,
            duration_s=self.duration_s,
            log_tail=self.log_tail,
        )


def built_outputs(
    outputs: Mapping[str, str], infos: Mapping[str, PathInfo] | Mapping[str, NarInfo]
) -> tuple[BuiltOutput, ...]:
    """`BuiltOutput`s from what the local store (`PathInfo`) or the cache (`NarInfo`) says."""
    return tuple(
        BuiltOutput(
            name=name,
            path=path,
            nar_hash=infos[path].nar_hash.nix32,
            nar_size=infos[path].nar_size,
            references=tuple(str(r) for r in infos[path].references),
        )
        for name, path in sorted(outputs.items())
    )


def log_tail(log: str, lines: int) -> str:
    """The last `lines` lines of a build log, bounded in size."""
    tail = "\n".join(log.rstrip().splitlines()[-lines:])
    return tail[-MAX_LOG_TAIL:]


def sorted_paths(paths: Iterable[object]) -> tuple[str, ...]:
    return tuple(sorted({str(p) for p in paths}))
