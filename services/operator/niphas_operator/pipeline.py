"""What the pipeline tells the operator: `eval.done` and `build.done`, recorded in the status
of every workload they match, then handed to the reconciler through the work queue.

A workload matches an event when its flakeRef maps to the event's repository (see
`niphas_common.flakeref`), the attribute is the one built, and either `spec.revision` is
the commit or, with no revision, the event's ref is the one the workload follows
(`flakeref.same_branch`). A
workload pinned to a store path (a rollback) takes no builds until unpinned. A failed build
sets Degraded and leaves the store path (and so the Deployment) as it was.

Events carry when their commit was pushed (`pushed_at`), and results of several pushes arrive
in any order (eval workers and builds run concurrently), so a workload following a ref keeps
the newest: the push time of what it took is kept in status (`pushedAt` for the build it
moved to, `evaluated.pushedAt` for the evaluation), and a result of an earlier push is
ignored, with the reason logged and recorded as a `Superseded` Event on the workload. A
pinned `spec.revision` names its commit, so its results are never ordered out.

A workload's `attribute` is a name of the flake's packages (`default`, matched in any
system's packages) or a dotted path (`packages.x86_64-linux.default`, matched by its path).
A multi-architecture workload takes each architecture's evaluation from the attribute of
its system, and a build for the architecture whose evaluated output it produced. Each result
taken is also recorded as an Event (Evaluated, EvaluationFailed, Built, BuildFailed) naming
the commit and the store path.

Every status write carries the resourceVersion it read (409 -> read again), so handlers and
the reconciler never overwrite each other's conditions. Handlers are idempotent: the same
event twice leaves the same status.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from niphas_common import tracing
from niphas_common.bus.consumer import Delivery
from niphas_common.errors import TransientError
from niphas_common.flakeref import (
    UnusableRepository,
    repository_of,
    same_branch,
    same_repository,
)
from niphas_common.kube.client import KubeConflict
from niphas_operator.reconciler import built_from
from niphas_operator.status import StatusBuilder, moved_to
from niphas_operator.store import WorkloadStore
from niphas_operator.workload import ArchitectureStatus, Workload, now_rfc3339, program_of
from niphas_schemas import BuildDone, EvalDone
from niphas_schemas.events import EvaluatedAttribute

log = logging.getLogger(__name__)

Enqueue = Callable[[tuple[str, str], dict[str, Any] | None], None]
"""Hand a workload to the reconciler, with its latest copy when we have one."""
Stale = Callable[[Workload], str | None]
"""Why an event is older than what the workload already took, or None."""
_ATTEMPTS = 5
CLOSURE_PATHS_MAX = 2000
"""Store paths of a closure kept in `status.closurePaths` (its count is always whole)."""


@dataclass(frozen=True)
class Note:
    """The Event telling people about a result taken."""

    reason: str
    message: str
    warning: bool = False


@dataclass(frozen=True)
class Outcome:
    patch: dict[str, Any] | None
    note: Note | None = None


def matches(
    workload: Workload, repository: str, commit: str, attribute: str | None, ref: str | None
) -> bool:
    spec = workload.spec
    if workload.deleting or spec.store_path:
        return False
    if attribute is not None and workload.attribute_name != attribute:
        return False
    if spec.revision:
        if spec.revision != commit:
            return False
    elif not same_branch(workload.ref, ref):
        return False
    try:
        return same_repository(repository_of(spec.flake_ref), repository)
    except UnusableRepository:
        return False


def stamp(pushed_at: datetime | None) -> str | None:
    """How a push time is kept in status (RFC 3339, UTC)."""
    return None if pushed_at is None else pushed_at.astimezone(UTC).isoformat()


def _newer_taken(workload: Workload, pushed_at: datetime | None, taken: object) -> bool:
    """Whether the workload already took a result of a push later than `pushed_at`. Without
    either time (an event or a status from before push times existed) nothing is ordered."""
    if workload.spec.revision or pushed_at is None or not isinstance(taken, str):
        return False
    try:
        return datetime.fromisoformat(taken) > pushed_at
    except (ValueError, TypeError):  # not a time, or one without its zone
        return False


def stale_build(workload: Workload, event: BuildDone) -> str | None:
    status = workload.obj.get("status") or {}
    if not _newer_taken(workload, event.pushed_at, status.get("pushedAt")):
        return None
    return (
        f"ignored the build of {event.attribute} at {event.commit[:12]} "
        f"(pushed {stamp(event.pushed_at)}): it runs {str(status.get('commit'))[:12]}, "
        f"pushed later ({status['pushedAt']})"
    )


def stale_evaluation(workload: Workload, event: EvalDone) -> str | None:
    evaluated = (workload.obj.get("status") or {}).get("evaluated") or {}
    if not _newer_taken(workload, event.pushed_at, evaluated.get("pushedAt")):
        return None
    return (
        f"ignored the evaluation at {event.commit[:12]} (pushed {stamp(event.pushed_at)}): "
        f"it has evaluated {str(evaluated.get('commit'))[:12]}, pushed later "
        f"({evaluated['pushedAt']})"
    )


class PipelineEvents:
    def __init__(self, store: WorkloadStore, enqueue: Enqueue) -> None:
        self._store = store
        self._enqueue = enqueue

    async def on_build_done(self, event: BuildDone, delivery: Delivery) -> None:
        for workload in await self._matching(
            event.repository, event.commit, event.attribute, event.ref
        ):
            await self._update(
                workload,
                event.msg_id,
                lambda w: stale_build(w, event),
                lambda w: _build_status(w, event),
            )

    async def on_eval_done(self, event: EvalDone, delivery: Delivery) -> None:
        for workload in await self._matching(event.repository, event.commit, None, event.ref):
            await self._update(
                workload,
                event.msg_id,
                lambda w: stale_evaluation(w, event),
                lambda w: _eval_status(w, event),
            )

    async def _matching(
        self, repository: str, commit: str, attribute: str | None, ref: str | None
    ) -> list[Workload]:
        found = [Workload(obj) for obj in await self._store.list()]
        return [w for w in found if matches(w, repository, commit, attribute, ref)]

    async def _update(
        self,
        workload: Workload,
        about: str,
        stale: Stale,
        compute: Callable[[Workload], Outcome],
    ) -> None:
        written: dict[str, Any] | None = None
        note: Note | None = None
        for _ in range(_ATTEMPTS):
            # Judged on every fresh read: a concurrent handler may just have taken a newer push.
            reason = stale(workload)
            if reason is not None:
                log.info("%s/%s %s", workload.namespace, workload.name, reason)
                await self._store.record(workload, "Superseded", reason, about=about)
                return
            outcome = compute(workload)
            patch, note = outcome.patch, outcome.note
            if patch is None:
                break
            patch["metadata"] = {"resourceVersion": workload.resource_version}
            try:
                written = await self._store.merge_patch_status(workload.key, patch)
                break
            except KubeConflict:
                fresh = await self._store.get(workload.key)
                if fresh is None:
                    return
                workload = Workload(fresh)
        else:
            raise KubeConflict(409, f"{workload.namespace}/{workload.name}: status kept changing")
        if note is not None and written is not None:
            await self._store.record(
                workload, note.reason, note.message, about=f"{note.reason}:{about}",
                warning=note.warning,
            )  # fmt: skip
        self._enqueue(workload.key, written)


def _build_status(workload: Workload, event: BuildDone) -> Outcome:
    status = StatusBuilder(workload)
    if event.status == "failed":
        tail = (event.log_tail or "").strip().splitlines()[-5:]
        message = f"build of {event.attribute} at {event.commit[:12]} failed: " + " | ".join(tail)
        status.condition("Built", False, "BuildFailed", message)
        status.condition("Degraded", True, "BuildFailed", message)
        # The phase is the reconciler's (it records the change as an Event).
        return Outcome(status.patch(), Note("BuildFailed", message, warning=True))
    out = next((o for o in event.outputs if o.name == "out"), event.outputs[0])
    if not _for_its_system(workload, event, out.path):
        return Outcome(None)
    note = Note(
        "Built",
        f"built {event.attribute} at {event.commit[:12]}: {out.path} "
        f"({len(event.closure) or len(event.outputs)} paths in its closure)",
    )
    entries = workload.architecture_entries()
    if entries:
        index = _architecture_of(entries, out.path)
        if index is None:
            log.info(
                "%s/%s: the build of %s is for none of its architectures",
                *workload.key,
                out.path,
            )
            return Outcome(None)
        main = entries[index].main_program or program_of(out.path)
        entries[index] = entries[index].model_copy(
            update={"store_path": out.path, "commit": event.commit, "main_program": main}
        )
        status.set(architectures=[e.model_dump(by_alias=True, exclude_none=True) for e in entries])
        if index > 0:
            return Outcome(status.patch(), note)
    evaluated = (workload.obj.get("status") or {}).get("evaluated") or {}
    main_program = (
        evaluated.get("mainProgram") if evaluated.get("outPath") == out.path else None
    ) or program_of(out.path)
    # This runs in the span of the build.done being handled: the pods' volume will carry it,
    # so the mount on the node joins the push's trace.
    traceparent = tracing.inject({}).get("traceparent")
    if traceparent:
        status.set(traceparent=traceparent)
    status.set(
        **moved_to(workload, out.path, event.commit, main_program),
        pushedAt=stamp(event.pushed_at),
        builtFrom=built_from(workload),
        closure={
            "pathCount": len(event.closure) or len(event.outputs),
            "narSize": sum(o.nar_size for o in event.outputs),
        },
        closurePaths=sorted(event.closure or [o.path for o in event.outputs])[:CLOSURE_PATHS_MAX],
    )
    status.condition("Built", True, event.status.capitalize(), f"{event.drv_path}")
    where = event.cache_url or "the binary cache"
    status.condition("ClosureAvailable", True, "InCache", f"{out.path} in {where}")
    status.condition("Degraded", False, "BuildSucceeded", "")
    return Outcome(status.patch(), note)


def _for_its_system(workload: Workload, event: BuildDone, out_path: str) -> bool:
    """Whether a build is of the system(s) a workload runs. A build names no system: a
    workload naming one (`packages.<system>.x`, or two or more architectures) takes a build
    whose output an evaluation of the commit named for it. A build handled before that
    evaluation is retried (TransientError: the consumer's backoff) until it is there."""
    entries = workload.architecture_entries()
    if workload.attribute_system is None and len(entries) < 2:
        return True
    status = workload.obj.get("status") or {}
    evaluated = status.get("evaluated") or {}
    named = {e.evaluated_out_path for e in entries}
    if evaluated.get("commit") == event.commit:
        named.add(evaluated.get("outPath"))
    if out_path in named:
        return True
    seen = {evaluated.get("commit"), (status.get("lastEval") or {}).get("commit")}
    if event.commit in seen:
        return False  # evaluated: the output is another system's
    raise TransientError(
        f"{workload.namespace}/{workload.name}: the build of {event.commit[:12]} came before "
        "its evaluation, which says which system it is for"
    )


def _architecture_of(entries: list[ArchitectureStatus], out_path: str) -> int | None:
    """Which architecture a build is for: the one whose evaluation named its output (a
    workload of one architecture takes any)."""
    for i, entry in enumerate(entries):
        if entry.evaluated_out_path == out_path:
            return i
    return 0 if len(entries) == 1 else None


def _chosen(workload: Workload, event: EvalDone, system: str | None) -> EvaluatedAttribute | None:
    """The workload's attribute in the evaluation: by its path when dotted, else by name
    (of `system` when given)."""
    dotted = "." in workload.spec.attribute
    for attr in event.attributes:
        if dotted and attr.attr_path == workload.spec.attribute:
            return attr
        named = not dotted and attr.attribute == workload.spec.attribute
        if named and (system is None or attr.system == system):
            return attr
    return None


def _eval_status(workload: Workload, event: EvalDone) -> Outcome:
    status = StatusBuilder(workload)
    entries = workload.architecture_entries()
    systems = {a.system for a in event.attributes}
    wanted = {e.system for e in entries} or (
        {workload.attribute_system} if workload.attribute_system else set()
    )
    if event.status == "succeeded" and wanted and not wanted & systems:
        # An eval worker of another system: it says nothing about this workload's (and its
        # builds are not this workload's).
        other = ", ".join(sorted(systems)) or "no system"
        status.set(
            lastEval={
                "commit": event.commit,
                "time": now_rfc3339(),
                "succeeded": True,
                "message": f"evaluated for {other}, not for {', '.join(sorted(wanted))}",
            }
        )
        return Outcome(status.patch())
    attr: EvaluatedAttribute | None = None
    if entries:
        for i, entry in enumerate(entries):
            found = _chosen(workload, event, entry.system)
            if found is not None and found.error is None and found.outputs:
                out_path = found.outputs.get("out") or next(iter(found.outputs.values()))
                entries[i] = entry.model_copy(
                    update={
                        "evaluated_out_path": out_path,
                        "main_program": found.main_program or entry.main_program,
                    }
                )
            attr = attr or found
        status.set(architectures=[e.model_dump(by_alias=True, exclude_none=True) for e in entries])
    else:
        attr = _chosen(workload, event, None)
    error = event.error if event.status == "failed" else (attr.error if attr else None)
    if attr is None and error is None:
        named = ", ".join(e.system for e in entries)
        error = f"the flake has no attribute {workload.spec.attribute!r}" + (
            f" for {named}" if named else ""
        )
    last: dict[str, Any] = {
        "commit": event.commit,
        "time": now_rfc3339(),
        "succeeded": error is None,
        "message": None,
    }
    if error is not None:
        message = f"evaluation at {event.commit[:12]} failed: {error}"
        status.condition("Evaluated", False, "EvaluationFailed", message)
        status.condition("Degraded", True, "EvaluationFailed", message)
        status.set(lastEval={**last, "message": message[:1024]})
        return Outcome(status.patch(), Note("EvaluationFailed", message, warning=True))
    assert attr is not None
    out = attr.outputs.get("out") or next(iter(attr.outputs.values()))
    # Every key, None ones too: a merge patch keeps what it does not name.
    evaluated: dict[str, Any] = {
        "commit": event.commit,
        "outPath": out,
        "mainProgram": attr.main_program or None,
        "pushedAt": stamp(event.pushed_at),
    }
    status.set(evaluated=evaluated, lastEval={**last, "message": f"{attr.attr_path} -> {out}"})
    status.condition("Evaluated", True, "Evaluated", f"{attr.attr_path} -> {out}")
    note = Note("Evaluated", f"evaluated {attr.attr_path} at {event.commit[:12]}: {out}")
    return Outcome(status.patch(), note)
