"""The controller a leader runs: watches feed the work queue, workers reconcile, and the
durable consumers of `eval.done` and `build.done` record what the pipeline did.

Watches list first, then watch from the list's resourceVersion; a stream the server closes
is resumed from the last version seen (bookmarks included), a 410 Gone (that version was
compacted away) relists, and every `resync_s` a full relist re-queues everything: whatever
a missed event would have changed is repaired by the next reconcile. Owned Deployments are
watched too, so their readiness reaches the workload's status.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from niphas_common.bus.bus import Bus
from niphas_common.bus.consumer import Handler, Subscription
from niphas_common.bus.topology import ConsumerSpec
from niphas_common.errors import TransientError
from niphas_operator.kube import Conflict, Gone, Invalid, Kube, KubeError, workloads_path
from niphas_operator.pipeline import PipelineEvents
from niphas_operator.reconciler import Reconciler
from niphas_operator.settings import OperatorSettings
from niphas_operator.workload import MANAGED_BY, NAME_LABEL
from niphas_operator.workqueue import WorkQueue
from niphas_schemas import BuildDone, EvalDone, Event

log = logging.getLogger(__name__)
CONFLICT_RETRY_S = 0.01
"""First retry of a reconcile whose write lost a race (409), doubled per conflict in a row."""

Key = tuple[str, str]
KeyOf = Callable[[dict[str, object]], Key | None]
OwnCheck = Callable[[dict[str, object]], bool]
"""Whether a watched object is exactly what this operator last wrote."""
_WATCH_TIMEOUT_S = 240


class Controller:
    def __init__(
        self, kube: Kube, bus: Bus, reconciler: Reconciler, settings: OperatorSettings
    ) -> None:
        self._kube = kube
        self._bus = bus
        self._reconciler = reconciler
        self._settings = settings
        self.queue: WorkQueue[Key] = WorkQueue(
            retry_base_s=settings.retry_base_s, retry_max_s=settings.retry_max_s
        )
        self.events = PipelineEvents(kube, self._enqueue_latest, settings.namespace)
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
            except Conflict as exc:
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
        path = workloads_path(self._settings.namespace)
        await self._list_and_watch(path, None, _own_key, skip=self._own_write)

    async def _watch_deployments(self) -> None:
        namespace = self._settings.namespace
        path = (
            "/apis/apps/v1/deployments"
            if namespace is None
            else f"/apis/apps/v1/namespaces/{namespace}/deployments"
        )
        selector = f"app.kubernetes.io/managed-by={MANAGED_BY}"
        await self._list_and_watch(path, selector, _owner_key, self._own_apply)

    async def _list_and_watch(
        self,
        path: str,
        selector: str | None,
        key_of: KeyOf,
        skip: OwnCheck | None = None,
    ) -> None:
        failures = 0
        while True:
            try:
                items, version = await self._kube.list(path, label_selector=selector)
                if selector is None:
                    self._objects = {k: o for o in items if (k := _own_key(o)) is not None}
                for obj in items:
                    self._add(key_of(obj))
                if selector is None:
                    self.synced.set()
                listed = time.monotonic()
                while time.monotonic() - listed < self._settings.resync_s:
                    async for kind, obj in self._kube.watch(
                        path,
                        version,
                        timeout_s=min(_WATCH_TIMEOUT_S, int(self._settings.resync_s) + 1),
                        label_selector=selector,
                    ):
                        version = obj.get("metadata", {}).get("resourceVersion", version)
                        if kind != "BOOKMARK":
                            key = key_of(obj)
                            if selector is None and key is not None:
                                self._remember(kind, key, obj)
                            self._on_event(kind, obj, key, skip)
                    failures = 0
            except Gone:
                log.info("watch %s: resourceVersion expired, relisting", path)
            except KubeError as exc:
                failures += 1
                delay = min(self._settings.retry_base_s * 2**failures, self._settings.retry_max_s)
                log.warning("watch %s failed (%s); relist in %.1fs", path, exc, delay)
                await asyncio.sleep(delay)

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
