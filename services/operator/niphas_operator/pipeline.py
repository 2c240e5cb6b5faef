"""What the pipeline tells the operator: `eval.done` and `build.done`, recorded in the status
of every workload they match, then handed to the reconciler through the work queue.

A workload matches an event when its flakeRef maps to the event's repository (see
`flakeref`), the attribute is the one built, and `spec.revision`, when set, is the commit. A
workload pinned to a store path (a rollback) takes no builds until unpinned. A failed build
sets Degraded and leaves the store path (and so the Deployment) as it was.

Every status write carries the resourceVersion it read (409 -> read again), so handlers and
the reconciler never overwrite each other's conditions. Handlers are idempotent: the same
event twice leaves the same status.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from niphas_common import tracing
from niphas_common.bus.consumer import Delivery
from niphas_operator.flakeref import FlakeRefError, repository_of, same_repository
from niphas_operator.kube import Conflict, Kube, workload_path, workloads_path
from niphas_operator.reconciler import built_from
from niphas_operator.status import StatusBuilder, moved_to
from niphas_operator.workload import Workload, program_of
from niphas_schemas import BuildDone, EvalDone

log = logging.getLogger(__name__)

Enqueue = Callable[[tuple[str, str], dict[str, Any] | None], None]
"""Hand a workload to the reconciler, with its latest copy when we have one."""
_ATTEMPTS = 5


def matches(workload: Workload, repository: str, commit: str, attribute: str | None) -> bool:
    spec = workload.spec
    if workload.deleting or spec.store_path:
        return False
    if attribute is not None and spec.attribute != attribute:
        return False
    if spec.revision and spec.revision != commit:
        return False
    try:
        return same_repository(repository_of(spec.flake_ref), repository)
    except FlakeRefError:
        return False


class PipelineEvents:
    def __init__(self, kube: Kube, enqueue: Enqueue, namespace: str | None) -> None:
        self._kube = kube
        self._enqueue = enqueue
        self._namespace = namespace

    async def on_build_done(self, event: BuildDone, delivery: Delivery) -> None:
        for workload in await self._matching(event.repository, event.commit, event.attribute):
            await self._update(workload, lambda w: _build_status(w, event))

    async def on_eval_done(self, event: EvalDone, delivery: Delivery) -> None:
        for workload in await self._matching(event.repository, event.commit, None):
            await self._update(workload, lambda w: _eval_status(w, event))

    async def _matching(
        self, repository: str, commit: str, attribute: str | None
    ) -> list[Workload]:
        items, _ = await self._kube.list(workloads_path(self._namespace))
        found = [Workload(obj) for obj in items]
        return [w for w in found if matches(w, repository, commit, attribute)]

    async def _update(
        self, workload: Workload, compute: Callable[[Workload], dict[str, Any] | None]
    ) -> None:
        path = workload_path(workload.namespace, workload.name)
        written: dict[str, Any] | None = None
        for _ in range(_ATTEMPTS):
            patch = compute(workload)
            if patch is None:
                break
            patch["metadata"] = {"resourceVersion": workload.resource_version}
            try:
                written = await self._kube.merge_patch(f"{path}/status", patch)
                break
            except Conflict:
                fresh = await self._kube.get(path)
                if fresh is None:
                    return
                workload = Workload(fresh)
        else:
            raise Conflict(409, f"{path}: status kept changing")
        self._enqueue(workload.key, written)


def _build_status(workload: Workload, event: BuildDone) -> dict[str, Any] | None:
    status = StatusBuilder(workload)
    if event.status == "failed":
        tail = (event.log_tail or "").strip().splitlines()[-5:]
        message = f"build of {event.attribute} at {event.commit[:12]} failed: " + " | ".join(tail)
        status.condition("Built", False, "BuildFailed", message)
        status.condition("Degraded", True, "BuildFailed", message)
        status.set(phase="Degraded")
        return status.patch()
    out = next((o for o in event.outputs if o.name == "out"), event.outputs[0])
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
        builtFrom=built_from(workload),
        closure={
            "pathCount": len(event.closure) or len(event.outputs),
            "narSize": sum(o.nar_size for o in event.outputs),
        },
    )
    status.condition("Built", True, event.status.capitalize(), f"{event.drv_path}")
    where = event.cache_url or "the binary cache"
    status.condition("ClosureAvailable", True, "InCache", f"{out.path} in {where}")
    status.condition("Degraded", False, "BuildSucceeded", "")
    return status.patch()


def _eval_status(workload: Workload, event: EvalDone) -> dict[str, Any] | None:
    status = StatusBuilder(workload)
    attr = next((a for a in event.attributes if a.attribute == workload.spec.attribute), None)
    error = event.error if event.status == "failed" else (attr.error if attr else None)
    if attr is None and error is None:
        error = f"the flake has no attribute {workload.spec.attribute!r}"
    if error is not None:
        message = f"evaluation at {event.commit[:12]} failed: {error}"
        status.condition("Evaluated", False, "EvaluationFailed", message)
        status.condition("Degraded", True, "EvaluationFailed", message)
        return status.patch()
    assert attr is not None
    out = attr.outputs.get("out") or next(iter(attr.outputs.values()))
    evaluated: dict[str, Any] = {"commit": event.commit, "outPath": out}
    if attr.main_program:
        evaluated["mainProgram"] = attr.main_program
    status.set(evaluated=evaluated)
    status.condition("Evaluated", True, "Evaluated", f"{attr.attr_path} -> {out}")
    return status.patch()
