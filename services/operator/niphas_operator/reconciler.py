"""One reconcile of one workload: read it, make its children match, write its status.

The one reconciler of both modes: it works on a `WorkloadStore`, the API server's or the
files' (render mode), never on either directly.

Level-triggered: the outcome depends only on what the store holds now, never on which
event woke the worker, so a missed or repeated event costs nothing. Which store path runs:
a pinned `spec.storePath` (rollback) wins, else the path the latest matching `build.done`
recorded in status. A workload with neither, or whose source changed since its path was
built, asks the pipeline once per generation with `push.received`.

A multi-architecture workload (`spec.architectures`) gets one Deployment per architecture,
each running the store path built for that architecture's system on nodes of that
architecture; the first architecture is the one `status.storePath` and rollbacks speak of.
Each step of a workload's life (provisioned, rolled back, available, degraded, failed) is
recorded as a Kubernetes Event naming the commit and store path; a change of the phase (or of
the commit) of a workload that runs one is published as `workload.status` for whoever reports
rollouts (the reporter's commit statuses).
"""

from __future__ import annotations

import asyncio
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
from niphas_operator.deployment_cache import UNKNOWN, DeploymentCache
from niphas_operator.lifecycle import lifecycle
from niphas_operator.status import StatusBuilder, history_entry, moved_to
from niphas_operator.store import WorkloadStore
from niphas_operator.workload import (
    ARCH_LABEL,
    ARCHITECTURE_SYSTEMS,
    FINALIZER,
    Workload,
    program_of,
)
from niphas_schemas import Event, PathWanted, PushReceived, WorkloadRolled

log = logging.getLogger(__name__)

RECONCILES = Counter("niphas_operator_reconciles_total", "Reconciles run, by outcome", ["outcome"])
REQUESTS_PUBLISHED = Counter(
    "niphas_operator_push_requests_total", "push.received published for workloads"
)
ROLLOUTS_PUBLISHED = Counter(
    "niphas_operator_rollouts_published_total", "workload.status published, by phase", ["phase"]
)
ROLLOUT_PHASES = ("Provisioning", "Running", "Degraded", "Failed")
"""The phases of a workload running a commit: what `workload.status` announces."""

Publish = Callable[[Event], Awaitable[object]]
ALLOWED = "Ready"
"""The condition saying the operator may not write the workload's children (False, reason
Forbidden, with the API server's answer); removed once a reconcile could write them."""
CHILD_KINDS = (
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("networking.k8s.io/v1", "Ingress"),
)
Target = tuple[str | None, "Desired | None"]
"""An architecture (None: a single-architecture workload) and what its Deployment runs
(None: nothing built for it yet)."""


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


def targets(workload: Workload, desired: Desired | None) -> list[Target]:
    """The Deployments the workload wants: one, or one per architecture (the first
    architecture runs `desired`, the others what their builds recorded)."""
    if not workload.spec.architectures:
        return [(None, desired)]
    found: list[Target] = []
    for i, entry in enumerate(workload.architecture_entries()):
        if i == 0:
            found.append((entry.architecture, desired))
        elif entry.store_path:
            program = entry.main_program or program_of(entry.store_path)
            found.append(
                (entry.architecture, Desired(entry.store_path, entry.commit, program, False))
            )
        else:
            found.append((entry.architecture, None))
    return found


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
        self.deployments = DeploymentCache()
        """The store path each Deployment runs, fed by the controller's Deployment watch."""
        self._etc_applied: dict[str, str] = {}
        """Content digest of the shared /etc ConfigMap this process applied, per namespace."""
        self._etc_locks: dict[str, asyncio.Lock] = {}
        """Per namespace: applying the shared /etc and deciding to delete it never overlap."""
        self._former_etc_gone: set[tuple[str, str, str]] = set()
        """(namespace, name, uid) of the workloads whose per-workload /etc ConfigMap of an
        earlier operator this process has deleted (or knows never existed)."""
        self._announced: dict[tuple[str, str], tuple[str, str, str]] = {}
        """(uid, commit, phase) of the last rollout seen per workload, so a new commit in the
        same phase (a push while the last one still provisions) is announced too."""

    async def reconcile(
        self, namespace: str, name: str, known: dict[str, Any] | None = None
    ) -> None:
        """`known`: the object as the watch last delivered it, saving a read (and the
        Deployments are then taken from the watch's cache too). Every write carries its
        resourceVersion, so a stale copy costs a 409 and a retry, never a lost update;
        retries read afresh."""
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
        problem = children.invalid_spec(workload)
        if problem is not None:
            # Nothing is applied: what runs keeps running until the spec is fixed.
            status.condition("Valid", False, "InvalidSpec", problem)
            await self._conclude(workload, status, None)
            RECONCILES.labels("invalid").inc()
            return
        status.clear("Valid")
        await self._request_build(workload, status)
        desired = desired_path(workload)
        wanted = targets(workload, desired)
        if all(d is None for _, d in wanted):
            await self._conclude(workload, status, None)
            RECONCILES.labels("pending").inc()
            return
        try:
            deployments = await self._apply_children(workload, wanted, cached=known is not None)
        except Forbidden as exc:
            await self._forbidden(workload, status, exc)
            raise  # the controller retries with backoff: the permission may be granted
        status.clear(ALLOWED)
        await self._schedulable(workload, status)
        self._running(workload, desired, status, deployments, len(wanted))
        await self._conclude(workload, status, desired)
        RECONCILES.labels("applied").inc()

    async def _conclude(
        self, workload: Workload, status: StatusBuilder, desired: Desired | None
    ) -> None:
        """Phase and reason from the conditions, an Event when the phase changed, the write."""
        phase, reason, message = lifecycle(workload, status, running=desired is not None)
        status.set(
            observedGeneration=workload.generation, phase=phase, reason=reason, message=message
        )
        if phase != workload.status.phase and phase in ("Running", "Degraded", "Failed"):
            where = "" if desired is None else f" (running {_what(desired)})"
            event = {"Running": "Available"}.get(phase, phase)
            await self._store.record(
                workload,
                event,
                f"{reason}: {message}{where}",
                about=f"phase:{phase}:{workload.resource_version}",
                warning=phase != "Running",
            )
        await self._announce_rollout(workload, desired, phase, reason, message)
        await self._write_status(workload, status)

    async def _announce_rollout(
        self, workload: Workload, desired: Desired | None, phase: str, reason: str, message: str
    ) -> None:
        """`workload.status` when the phase of the commit the workload runs changed. Published
        before the status is written: a failed write is retried and announces again (the
        same fact twice), never not at all."""
        if desired is None or desired.commit is None or phase not in ROLLOUT_PHASES:
            return
        now = (workload.uid, desired.commit, phase)
        last = self._announced.get(workload.key)
        if phase != workload.status.phase or (last is not None and last != now):
            await self._publish(
                WorkloadRolled(
                    namespace=workload.namespace,
                    name=workload.name,
                    repository=repository_of(workload.spec.flake_ref),
                    ref=workload.ref,
                    commit=desired.commit,
                    store_path=desired.store_path,
                    phase=phase,
                    reason=reason[:128] or phase,
                    message=message[:1024],
                )
            )
            ROLLOUTS_PUBLISHED.labels(phase).inc()
        self._announced[workload.key] = now

    async def _schedulable(self, workload: Workload, status: StatusBuilder) -> None:
        """Say when no node has one of the workload's architectures (instead of pods left
        Pending without a word)."""
        if not workload.spec.architectures:
            status.clear("Schedulable")
            return
        key, value = self._pod.store_node_label
        missing = []
        for arch in workload.spec.architectures:
            nodes = await self._store.nodes_labelled({ARCH_LABEL: arch, key: value})
            if nodes is None:
                status.clear("Schedulable")
                return  # no cluster to ask (render mode)
            if not nodes:
                missing.append(arch)
        if missing:
            status.condition(
                "Schedulable",
                False,
                "NoNodeForArchitecture",
                f"no node has {ARCH_LABEL}={' or '.join(missing)} and {key}={value}: "
                f"the {', '.join(missing)} pods cannot be scheduled",
            )
        else:
            status.condition("Schedulable", True, "NodesFound", "every architecture has nodes")

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
        desired: Desired | None,
        status: StatusBuilder,
        deployments: dict[str | None, dict[str, Any]],
        expected: int,
    ) -> None:
        """The status of a workload whose children run `desired`."""
        _readiness(workload, status, list(deployments.values()), expected)
        if workload.spec.architectures:
            entries = []
            for entry in workload.architecture_entries():
                observed = (deployments.get(entry.architecture) or {}).get("status") or {}
                ready = int(observed.get("readyReplicas") or 0)
                if entry.architecture == workload.spec.architectures[0] and desired:
                    entry = entry.model_copy(
                        update={
                            "store_path": desired.store_path,
                            "commit": desired.commit,
                            "main_program": desired.main_program,
                        }
                    )
                entry = entry.model_copy(update={"ready_replicas": ready})
                entries.append(entry.model_dump(by_alias=True, exclude_none=True))
            status.set(architectures=entries)
        elif workload.status.architectures:
            status.set(architectures=None)
        if desired is None:
            return
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
            resolvedCommand=children.resolved_command(
                workload, desired.store_path, desired.main_program
            ),
            replicas=workload.spec.replicas,
            selector=",".join(f"{k}={v}" for k, v in workload.selector().items()),
        )

    async def _apply_children(
        self, workload: Workload, wanted: list[Target], *, cached: bool
    ) -> dict[str | None, dict[str, Any]]:
        """Apply every child; the Deployments as stored, by architecture."""
        # Optional children can only have been dropped by a spec change after an earlier
        # reconcile; a new workload has none to delete.
        observed = workload.status.observed_generation
        spec_changed = observed is not None and observed != workload.generation
        await self._apply_etc(workload.namespace)
        await self._delete_former_etc(workload)
        applied: dict[str | None, dict[str, Any]] = {}
        for architecture, desired in wanted:
            if desired is not None:
                applied[architecture] = await self._apply_deployment(
                    workload, architecture, desired, cached=cached
                )
        if spec_changed:
            for name in _stale_deployments(workload):
                await self._store.delete("apps/v1", "Deployment", (workload.namespace, name))
                self.deployments.forget((workload.namespace, name))
        pdb_version = self._store.pdb_api_version
        optional = (
            (children.service(workload), ("v1", "Service")),
            (children.ingress(workload), ("networking.k8s.io/v1", "Ingress")),
            (
                children.disruption_budget(
                    workload,
                    pdb_version,
                    unhealthy_always_allow=self._store.pdb_unhealthy_policy,
                ),
                (pdb_version, "PodDisruptionBudget"),
            ),
        )
        for child, (api_version, kind) in optional:
            if child is not None:
                await self._store.apply(child)
            elif spec_changed:
                await self._store.delete(api_version, kind, workload.key)
        return applied

    def relisted(self) -> None:
        """After each full list of the workloads: the next reconcile in each namespace applies
        the shared /etc again (a no-op when unchanged), so a relist repairs a ConfigMap
        deleted behind the operator's back as it repairs everything else."""
        self._etc_applied.clear()

    def _etc_lock(self, namespace: str) -> asyncio.Lock:
        return self._etc_locks.setdefault(namespace, asyncio.Lock())

    async def _apply_etc(self, namespace: str) -> None:
        """The namespace's shared /etc ConfigMap, sent only when this process has not applied
        its content there yet (a CA bundle is a few hundred kilobytes: once per namespace)."""
        digest = children.etc_digest(self._pod)
        if self._etc_applied.get(namespace) == digest:
            return
        async with self._etc_lock(namespace):
            if self._etc_applied.get(namespace) == digest:
                return  # applied while this one waited
            await self._store.apply(children.etc_config_map(namespace, self._pod))
            self._etc_applied[namespace] = digest

    async def _release_etc(self, workload: Workload) -> None:
        """Delete the namespace's shared /etc with its last workload. The memo goes first:
        a workload created meanwhile then applies the ConfigMap again (after the lock) rather
        than trusting a memo of one that is being deleted; and one whose reconcile trusted
        the memo before existed before the list below, which then finds it."""
        namespace = workload.namespace
        async with self._etc_lock(namespace):
            applied = self._etc_applied.pop(namespace, None)
            if await self._store.workloads_remain(namespace, besides=workload.name):
                if applied is not None:
                    self._etc_applied[namespace] = applied
                return
            await self._store.delete("v1", "ConfigMap", (namespace, children.ETC_NAME))

    async def _delete_former_etc(self, workload: Workload) -> None:
        """The workload's own /etc ConfigMap of an earlier operator: deleted once per process
        (a DELETE, usually answered 404); a workload no operator reconciled yet (no
        observedGeneration) never had one."""
        seen = (*workload.key, workload.uid)
        if seen in self._former_etc_gone:
            return
        if workload.status.observed_generation is not None:
            former = (workload.namespace, children.former_etc_name(workload))
            await self._store.delete("v1", "ConfigMap", former)
        self._former_etc_gone.add(seen)

    async def _apply_deployment(
        self, workload: Workload, architecture: str | None, desired: Desired, *, cached: bool
    ) -> dict[str, Any]:
        name = children.deployment_name(workload, architecture)
        command = children.resolved_command(workload, desired.store_path, desired.main_program)
        # A rollback (pinned path) starts no trace of its own; a build's move carries its trace.
        traceparent = (
            None if desired.pinned else (workload.obj.get("status") or {}).get("traceparent")
        )
        manifest = children.deployment(
            workload, desired.store_path, command, self._pod, traceparent, architecture
        )
        key = (workload.namespace, name)
        current = self.deployments.store_path(key) if cached else UNKNOWN
        if current is UNKNOWN:
            found = await self._store.child("apps/v1", "Deployment", key)
            current = None if found is None else children.store_path_of(found)
        moving = current != desired.store_path
        if moving and not desired.pinned:
            # Rollbacks (pinned paths) skip preheating: they must be instant, and the CSI
            # driver still asks for a missing closure when a pod mounts it.
            await self._preheat(workload, desired.store_path)
        applied = await self._store.apply(manifest)
        self.own_deployments.add(workload.key, applied["metadata"]["resourceVersion"])
        self.deployments.applied(applied)
        if moving:
            await self._announce_move(workload, name, desired)
        return applied

    async def _announce_move(self, workload: Workload, name: str, desired: Desired) -> None:
        entry = history_entry(workload, desired.store_path)
        if desired.pinned:
            revision = f"revision {entry.revision}: " if entry else ""
            reason, message = "RolledBack", f"rolled back to {revision}{_what(desired)}"
        else:
            reason, message = "Provisioned", f"Deployment {name} runs {_what(desired)}"
        about = f"moved:{name}:{desired.store_path}:{workload.resource_version}"
        await self._store.record(workload, reason, message, about=about)

    async def _forbidden(self, workload: Workload, status: StatusBuilder, exc: Forbidden) -> None:
        """Say on the workload (a condition, a Warning Event) that its children may not be
        written in its namespace, instead of only a line in the operator's log."""
        message = (
            f"the operator may not create or change the Deployment, Service and "
            f"PodDisruptionBudget of this workload in namespace {workload.namespace}: "
            f"{exc.reason}"
        )
        status.condition(ALLOWED, False, "Forbidden", message)
        status.set(
            observedGeneration=workload.generation,
            phase="Degraded",
            reason="Forbidden",
            message=message[:1024],
        )
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
        owner references, but the finalizer does not rely on one), and the namespace's shared
        /etc with its last workload, then release the object."""
        kinds = [*CHILD_KINDS, (self._store.pdb_api_version, "PodDisruptionBudget")]
        for api_version, kind in kinds:
            await self._store.delete(api_version, kind, workload.key)
        for arch in workload.spec.architectures:
            name = children.deployment_name(workload, arch)
            await self._store.delete("apps/v1", "Deployment", (workload.namespace, name))
        await self._delete_former_etc(workload)
        await self._release_etc(workload)
        self.deployments.forget(workload.key)
        for arch in workload.spec.architectures:
            self.deployments.forget((workload.namespace, children.deployment_name(workload, arch)))
        self._former_etc_gone.discard((*workload.key, workload.uid))
        self._announced.pop(workload.key, None)
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


def _stale_deployments(workload: Workload) -> list[str]:
    """Deployments of another shape the workload may have had (single <-> multi-arch, an
    architecture removed)."""
    names = [children.deployment_name(workload, a) for a in ARCHITECTURE_SYSTEMS]
    if workload.spec.architectures:
        names.append(workload.name)
    keep = {children.deployment_name(workload, a) for a in workload.spec.architectures}
    return [n for n in names if n not in keep]


def _what(desired: Desired) -> str:
    commit = f" (commit {desired.commit[:12]})" if desired.commit else ""
    return f"{desired.store_path}{commit}"


def _readiness(
    workload: Workload, status: StatusBuilder, deployments: list[dict[str, Any]], expected: int
) -> None:
    wanted = workload.spec.replicas * expected
    ready = available = updated = 0
    rolled = len(deployments) == expected
    for deployment in deployments:
        observed = deployment.get("status") or {}
        ready += int(observed.get("readyReplicas") or 0)
        available += int(observed.get("availableReplicas") or 0)
        count = int(observed.get("updatedReplicas") or 0)
        updated += count
        generation = deployment["metadata"].get("generation", 0)
        rolled = (
            rolled
            and observed.get("observedGeneration", 0) >= generation
            and count >= workload.spec.replicas
        )
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
