"""One reconcile of one workload: read it, make its children match, write its status.

The one reconciler of both modes: it works on a `WorkloadStore`, the API server's or the
files' (render mode), never on either directly.

Level-triggered: the outcome depends only on what the store holds now, never on which
event woke the worker, so a missed or repeated event costs nothing. Which store path runs:
a pinned `spec.storePath` (rollback) wins, else the path the latest matching `build.done`
recorded in status. A workload with neither, or whose source changed since its path was
built, asks the pipeline once per generation with `push.received`.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import Counter

from niphas_common.flakeref import repository_of
from niphas_common.kube.client import Forbidden
from niphas_operator import children
from niphas_operator.children import PodSettings
from niphas_operator.status import StatusBuilder, history_entry, moved_to
from niphas_operator.store import WorkloadStore
from niphas_operator.workload import FINALIZER, Workload, program_of
from niphas_schemas import Event, PathWanted, PushReceived

log = logging.getLogger(__name__)

RECONCILES = Counter("niphas_operator_reconciles_total", "Reconciles run, by outcome", ["outcome"])
REQUESTS_PUBLISHED = Counter(
    "niphas_operator_push_requests_total", "push.received published for workloads"
)

Publish = Callable[[Event], Awaitable[object]]
ALLOWED = "Ready"
"""The condition saying the operator may not write the workload's children (False, reason
Forbidden, with the API server's answer); removed once a reconcile could write them."""
CHILD_KINDS = (("apps/v1", "Deployment"), ("v1", "Service"))


class OwnWrites:
    """The last few resourceVersions this operator wrote, per object."""

    def __init__(self, keep: int = 4) -> None:
        self._versions: dict[tuple[str, str], deque[str]] = {}
        self._keep = keep

    def add(self, key: tuple[str, str], resource_version: str) -> None:
        self._versions.setdefault(key, deque(maxlen=self._keep)).append(resource_version)

    def __contains__(self, item: tuple[tuple[str, str], object]) -> bool:
        key, resource_version = item
        return resource_version in self._versions.get(key, ())

    def forget(self, key: tuple[str, str]) -> None:
        self._versions.pop(key, None)


@dataclass(frozen=True)
class Desired:
    store_path: str
    commit: str | None
    main_program: str
    pinned: bool


def built_from(workload: Workload) -> str:
    return f"{workload.spec.flake_ref}#{workload.spec.attribute}"


def desired_path(workload: Workload) -> Desired | None:
    pinned = workload.spec.store_path
    if pinned:
        entry = history_entry(workload, pinned)
        return Desired(
            pinned,
            entry.commit if entry else None,
            (entry.main_program if entry else None) or program_of(pinned),
            pinned=True,
        )
    current = workload.status.store_path
    if current:
        return Desired(
            current,
            workload.status.commit,
            workload.status.main_program or program_of(current),
            pinned=False,
        )
    return None


def needs_build(workload: Workload) -> bool:
    """No store path yet, or the one we have was built from another source or commit."""
    if workload.spec.store_path:
        return False
    status = workload.status
    if not status.store_path:
        return True
    if (workload.obj.get("status") or {}).get("builtFrom") not in (None, built_from(workload)):
        return True
    return bool(workload.spec.revision and status.commit != workload.spec.revision)


def push_request(workload: Workload) -> PushReceived:
    spec = workload.spec
    return PushReceived(
        forge="niphas",
        repository=repository_of(spec.flake_ref),
        ref=workload.ref,
        commit=spec.revision,
        delivery_id=f"{workload.namespace}/{workload.name}/{workload.generation}",
    )


class Reconciler:
    def __init__(
        self,
        store: WorkloadStore,
        publish: Publish,
        pod: PodSettings,
        *,
        preheat_nodes: tuple[str, ...],
        preheat_deadline_s: float,
    ) -> None:
        self._store = store
        self._publish = publish
        self._pod = pod
        self._preheat_nodes = preheat_nodes
        self._preheat_deadline = timedelta(seconds=preheat_deadline_s)
        self.own_writes = OwnWrites()
        """Our writes to each workload: their watch events need no reconcile (it would find
        nothing to do)."""
        self.own_deployments = OwnWrites()
        """The same for each workload's Deployment (its later status changes are not ours)."""

    async def reconcile(
        self, namespace: str, name: str, known: dict[str, Any] | None = None
    ) -> None:
        """`known`: the object as the watch last delivered it, saving a read. Every write
        carries its resourceVersion, so a stale copy costs a 409 and a retry, never a
        lost update; retries read afresh."""
        obj = known or await self._store.get((namespace, name))
        if obj is None:
            RECONCILES.labels("gone").inc()
            return
        workload = Workload(obj)
        if workload.deleting:
            await self._clean_up(workload)
            RECONCILES.labels("deleted").inc()
            return
        workload = await self._with_finalizer(workload)
        status = StatusBuilder(workload)
        await self._request_build(workload, status)
        desired = desired_path(workload)
        if desired is None:
            status.set(observedGeneration=workload.generation, phase=_phase(status, None))
            await self._write_status(workload, status)
            RECONCILES.labels("pending").inc()
            return
        try:
            deployment = await self._apply_children(workload, desired)
        except Forbidden as exc:
            await self._forbidden(workload, status, exc)
            raise  # the controller retries with backoff: the permission may be granted
        status.clear(ALLOWED)
        self._running(workload, desired, status, deployment)
        await self._write_status(workload, status)
        RECONCILES.labels("applied").inc()

    async def _with_finalizer(self, workload: Workload) -> Workload:
        if FINALIZER in workload.finalizers:
            return workload
        patch = {
            "metadata": {
                "finalizers": [*workload.finalizers, FINALIZER],
                "resourceVersion": workload.resource_version,
            }
        }
        workload = Workload(await self._store.merge_patch(workload.key, patch))
        self.own_writes.add(workload.key, workload.resource_version)
        return workload

    async def _request_build(self, workload: Workload, status: StatusBuilder) -> None:
        """Ask the pipeline once per generation for a workload that needs a build."""
        if not needs_build(workload) or (
            workload.status.requested_generation == workload.generation
        ):
            return
        await self._publish(push_request(workload))
        REQUESTS_PUBLISHED.inc()
        status.set(requestedGeneration=workload.generation)
        if not status.current("Evaluated", workload.generation):
            # An eval.done may already have answered this generation (a retried reconcile
            # after a 409 with the pipeline's write): never hide its answer.
            status.condition(
                "Evaluated", None, "Requested", "push.received published; waiting for eval.done"
            )

    def _running(
        self,
        workload: Workload,
        desired: Desired,
        status: StatusBuilder,
        deployment: dict[str, Any],
    ) -> None:
        """The status of a workload whose children run `desired`."""
        _readiness(workload, status, deployment)
        if workload.status.store_path != desired.store_path:
            # A pinned path is a rollback to an entry of the history, or a path the user
            # chose: recorded as history only when it is not there yet.
            in_history = history_entry(workload, desired.store_path) is not None
            fields = moved_to(
                workload,
                desired.store_path,
                desired.commit,
                desired.main_program,
                record=not in_history,
            )
            status.set(**fields)
        status.set(
            observedGeneration=workload.generation,
            resolvedCommand=children.resolved_command(
                workload, desired.store_path, desired.main_program
            ),
            replicas=workload.spec.replicas,
            selector=",".join(f"{k}={v}" for k, v in workload.selector().items()),
        )
        status.set(phase=_phase(status, deployment))

    async def _apply_children(self, workload: Workload, desired: Desired) -> dict[str, Any]:
        # Optional children can only have been dropped by a spec change after an earlier
        # reconcile; a new workload has none to delete.
        observed = workload.status.observed_generation
        spec_changed = observed is not None and observed != workload.generation
        command = children.resolved_command(workload, desired.store_path, desired.main_program)
        # A rollback (pinned path) starts no trace of its own; a build's move carries its trace.
        traceparent = (
            None if desired.pinned else (workload.obj.get("status") or {}).get("traceparent")
        )
        manifest = children.deployment(
            workload, desired.store_path, command, self._pod, traceparent
        )
        if not desired.pinned:
            # Rollbacks (pinned paths) skip preheating: they must be instant, and the CSI
            # driver still asks for a missing closure when a pod mounts it.
            current = await self._store.child("apps/v1", "Deployment", workload.key)
            if current is None or children.store_path_of(current) != desired.store_path:
                await self._preheat(workload, desired.store_path)
        applied = await self._store.apply(manifest)
        self.own_deployments.add(workload.key, applied["metadata"]["resourceVersion"])
        pdb_version = self._store.pdb_api_version
        optional = (
            (children.service(workload), ("v1", "Service")),
            (
                children.disruption_budget(workload, pdb_version),
                (pdb_version, "PodDisruptionBudget"),
            ),
        )
        for child, (api_version, kind) in optional:
            if child is not None:
                await self._store.apply(child)
            elif spec_changed:
                await self._store.delete(api_version, kind, workload.key)
        return applied

    async def _forbidden(self, workload: Workload, status: StatusBuilder, exc: Forbidden) -> None:
        """Say on the workload (a condition, a Warning Event) that its children may not be
        written in its namespace, instead of only a line in the operator's log."""
        message = (
            f"the operator may not create or change the Deployment, Service and "
            f"PodDisruptionBudget of this workload in namespace {workload.namespace}: "
            f"{exc.reason}"
        )
        status.condition(ALLOWED, False, "Forbidden", message)
        status.set(observedGeneration=workload.generation, phase="Degraded")
        await self._store.record(workload, "Forbidden", message, about="forbidden", warning=True)
        await self._write_status(workload, status)

    async def _preheat(self, workload: Workload, store_path: str) -> None:
        nodes = self._preheat_nodes or await self._store.nodes_running(workload)
        deadline = datetime.now(UTC) + self._preheat_deadline
        for node in nodes:
            await self._publish(
                PathWanted(
                    node=node,
                    store_paths=(store_path,),
                    deadline=deadline,
                    requester=f"operator:{workload.namespace}/{workload.name}",
                )
            )

    async def _write_status(self, workload: Workload, status: StatusBuilder) -> None:
        patch = status.patch()
        if patch is None:
            return
        # The resourceVersion makes a concurrent status writer (a build.done handler) a 409
        # and a retry, instead of a lost update.
        patch["metadata"] = {"resourceVersion": workload.resource_version}
        written = await self._store.merge_patch_status(workload.key, patch)
        self.own_writes.add(workload.key, written["metadata"]["resourceVersion"])

    async def _clean_up(self, workload: Workload) -> None:
        """Delete the children ourselves (a cluster's garbage collector would also follow the
        owner references, but the finalizer does not rely on one), then release the object."""
        kinds = [*CHILD_KINDS, (self._store.pdb_api_version, "PodDisruptionBudget")]
        for api_version, kind in kinds:
            await self._store.delete(api_version, kind, workload.key)
        self.own_writes.forget(workload.key)
        self.own_deployments.forget(workload.key)
        if FINALIZER in workload.finalizers:
            remaining = [f for f in workload.finalizers if f != FINALIZER]
            await self._store.merge_patch(
                workload.key,
                {
                    "metadata": {
                        "finalizers": remaining or None,
                        "resourceVersion": workload.resource_version,
                    }
                },
            )


def _readiness(workload: Workload, status: StatusBuilder, deployment: dict[str, Any]) -> None:
    observed = deployment.get("status") or {}
    wanted = workload.spec.replicas
    ready = int(observed.get("readyReplicas") or 0)
    available = int(observed.get("availableReplicas") or 0)
    updated = int(observed.get("updatedReplicas") or 0)
    generation = deployment["metadata"].get("generation", 0)
    rolled = observed.get("observedGeneration", 0) >= generation and updated >= wanted
    status.set(readyReplicas=ready)
    if rolled:
        status.condition("Progressing", False, "RolloutComplete", f"{updated} updated")
    else:
        status.condition(
            "Progressing", True, "RollingOut", f"{updated} of {wanted} replicas updated"
        )
    if available >= wanted and rolled:
        status.condition("Available", True, "MinimumReplicasAvailable", f"{available} available")
    else:
        status.condition(
            "Available", False, "ReplicasUnavailable", f"{available} of {wanted} available"
        )


def _phase(status: StatusBuilder, deployment: dict[str, Any] | None) -> str:
    conditions = {c["type"]: c["status"] for c in status.conditions()}
    if conditions.get("Degraded") == "True":
        return "Degraded"
    if deployment is None:
        return "Pending"
    if conditions.get("Available") == "True":
        return "Running"
    return "Progressing"
