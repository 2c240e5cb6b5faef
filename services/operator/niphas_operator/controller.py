"""The controller (what a leader runs in a cluster, and the one process in render mode): the
store's list + watch streams feed the work queue, workers reconcile, and the durable
consumers of `eval.done` and `build.done` record what the pipeline did.

The streams (`niphas_common.kube.watch` for the API server, polling for files) list first
and relist every `resync_s`; everything listed is queued again, so whatever a missed event
would have changed is repaired by the next reconcile. Owned Deployments are followed too, so
their readiness reaches the workload's status. Watch events of the reconciler's own writes
are recognised by resourceVersion and cause no second reconcile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from niphas_common.bus.bus import Bus
from niphas_common.bus.consumer import Handler, Subscription
from niphas_common.bus.topology import ConsumerSpec
from niphas_common.errors import TransientError
from niphas_common.kube.client import Invalid, KubeConflict
from niphas_common.kube.watch import LISTED, SYNCED, WatchEvent
from niphas_operator.pipeline import PipelineEvents
from niphas_operator.reconciler import Reconciler
from niphas_operator.settings import OperatorSettings
from niphas_operator.store import WorkloadStore
from niphas_operator.workload import NAME_LABEL
from niphas_operator.workqueue import WorkQueue
from niphas_schemas import BuildDone, EvalDone, Event

log = logging.getLogger(__name__)
CONFLICT_RETRY_S = 0.01
"""First retry of a reconcile whose write lost a race (409), doubled per conflict in a row."""

Key = tuple[str, str]
KeyOf = Callable[[dict[str, object]], Key | None]
OwnCheck = Callable[[dict[str, object]], bool]
"""Whether a watched object is exactly what this operator last wrote."""


class Controller:
    def __init__(
        self, store: WorkloadStore, bus: Bus, reconciler: Reconciler, settings: OperatorSettings
    ) -> None:
        self._store = store
        self._bus = bus
        self._reconciler = reconciler
        self._settings = settings
        self.queue: WorkQueue[Key] = WorkQueue(
            retry_base_s=settings.retry_base_s, retry_max_s=settings.retry_max_s
        )
        self.events = PipelineEvents(store, self._enqueue_latest)
        self._deferred: dict[Key, list[tuple[OwnCheck, dict[str, object]]]] = {}
        self._objects: dict[Key, dict[str, Any]] = {}
        """The latest copy of each workload the watch delivered."""
        self.synced = asyncio.Event()
        """Set once the first list of workloads is queued."""

    async def lead(self, lost: asyncio.Event) -> None:
        """Run until leadership is lost (or the service stops)."""
        subscriptions: list[Subscription[Any]] = [
            self._subscription(BuildDone, self._settings.build_consumer, self.events.on_build_done),
            self._subscription(EvalDone, self._settings.eval_consumer, self.events.on_eval_done),
        ]
        try:
            async with asyncio.TaskGroup() as group:
                background = [
                    group.create_task(self._watch_workloads()),
                    group.create_task(self._watch_deployments()),
                    *(group.create_task(self._worker(lost)) for _ in range(self._settings.workers)),
                ]
                group.create_task(self._bus.serve(subscriptions, lost, fetch_timeout_s=0.5))
                await lost.wait()
                for task in background:
                    task.cancel()
        finally:
            self.queue.close()

    def _subscription(
        self, model: type[Event], durable: str, handler: Handler[Any]
    ) -> Subscription[Any]:
        # A status write is quick: a minute of ack wait is ample. A short Kubernetes outage
        # is ridden out by the backoff; past max_deliver the event goes to dead.build.done.
        spec = ConsumerSpec(
            durable=durable,
            subject=model.subject,
            ack_wait_s=60,
            max_deliver=10,
            backoff_s=(1, 2, 5, 10, 30),
        )
        return Subscription(model, spec, handler, concurrency=self._settings.concurrency)

    async def _worker(self, lost: asyncio.Event) -> None:
        # Stopped by cancellation; `lost` too, since Python 3.11's wait_for (under the NATS
        # and HTTP clients) can swallow a cancel that lands as its awaited result arrives.
        while not lost.is_set():
            key = await self.queue.get()
            try:
                # The watch's latest copy on a first attempt; a retry reads afresh.
                known = None if self.queue.failures(key) else self._objects.get(key)
                await self._reconciler.reconcile(*key, known)
            except KubeConflict as exc:
                # Someone wrote the workload between our read and our write: the usual race
                # with the pipeline's status updates. Read it again almost at once (the retry
                # reads afresh); the full backoff would add half a second to a rollout.
                delay = self.queue.retry(key, CONFLICT_RETRY_S)
                log.info("reconcile %s/%s: %s; again in %.2fs", *key, exc, delay)
            except (Invalid, ValueError) as exc:
                # The object cannot become valid by retrying; it is retried at the slowest
                # pace so a fix (a new generation) is still picked up by the watch at once.
                log.error("reconcile %s/%s: %s", *key, exc)
                self.queue.retry(key)
            except (TransientError, OSError) as exc:
                delay = self.queue.retry(key)
                log.warning("reconcile %s/%s failed (%s); retry in %.1fs", *key, exc, delay)
            except Exception:
                delay = self.queue.retry(key)
                log.exception("reconcile %s/%s crashed; retry in %.1fs", *key, delay)
            else:
                self.queue.forget(key)
            finally:
                deferred = self._deferred.pop(key, [])
                self.queue.done(key)
                if any(not is_ours(obj) for is_ours, obj in deferred):
                    self.queue.add(key)

    async def _watch_workloads(self) -> None:
        listed: dict[Key, dict[str, Any]] = {}
        async for event in self._store.workload_events():
            key = None if event.kind == SYNCED else _own_key(event.obj)
            if event.kind == LISTED and key is not None:
                listed[key] = event.obj
            elif event.kind == SYNCED:
                self._objects, listed = listed, {}
                self._reconciler.relisted()
                self.synced.set()
            elif key is not None:
                self._remember(event.kind, key, event.obj)
            self._follow(event, key, self._own_write)

    async def _watch_deployments(self) -> None:
        self._reconciler.deployments.reset()  # a new term: nothing was watched meanwhile
        async for event in self._store.child_events():
            self._reconciler.deployments.observe(event)
            key = None if event.kind == SYNCED else _owner_key(event.obj)
            self._follow(event, key, self._own_apply)

    def _follow(self, event: WatchEvent, key: Key | None, skip: OwnCheck) -> None:
        """Queue what a list delivered, and what a watch event did not come from us."""
        if event.kind == LISTED:
            self._add(key)
        elif event.kind != SYNCED:
            self._on_event(event.kind, event.obj, key, skip)

    def _enqueue_latest(self, key: Key, obj: dict[str, Any] | None) -> None:
        # The copy a status write returned: newer than the watch may have delivered yet.
        if obj is not None:
            self._objects[key] = obj
        self.queue.add(key)

    def _remember(self, kind: str, key: Key, obj: dict[str, Any]) -> None:
        if kind == "DELETED":
            self._objects.pop(key, None)
        else:
            self._objects[key] = obj

    def _on_event(
        self, kind: str, obj: dict[str, object], key: Key | None, skip: OwnCheck | None
    ) -> None:
        if key is None:
            return
        if skip is not None and kind in ("ADDED", "MODIFIED"):
            if skip(obj):
                return
            if self.queue.processing(key):
                # Possibly the write the worker is making right now, its response not yet
                # back: decide once that worker is done.
                self._deferred.setdefault(key, []).append((skip, obj))
                return
        self.queue.add(key)

    def _own_write(self, obj: dict[str, object]) -> bool:
        """A watch event caused by the reconciler's own latest write (relists ignore this)."""
        key, meta = _own_key(obj), obj.get("metadata")
        if key is None or not isinstance(meta, dict):
            return False
        return (key, meta.get("resourceVersion")) in self._reconciler.own_writes

    def _own_apply(self, obj: dict[str, object]) -> bool:
        key, meta = _owner_key(obj), obj.get("metadata")
        if key is None or not isinstance(meta, dict):
            return False
        return (key, meta.get("resourceVersion")) in self._reconciler.own_deployments

    def _add(self, key: Key | None) -> None:
        if key is not None:
            self.queue.add(key)


def _own_key(obj: dict[str, object]) -> Key | None:
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return None
    return (str(meta["namespace"]), str(meta["name"]))


def _owner_key(obj: dict[str, object]) -> Key | None:
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return None
    name = (meta.get("labels") or {}).get(NAME_LABEL)
    return (str(meta["namespace"]), str(name)) if name else None
