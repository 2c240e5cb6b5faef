"""Publishing and unpublishing volumes: validate -> lock the volume -> lease -> make the closure
present -> mount its view at the target -> record. Every step is safe to repeat, and a failed
publish undoes what it did (nothing mounted, nothing leased)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import Histogram

from niphas_common import tracing
from niphas_common.leases import Leases

from . import mounts
from .closure import Closures
from .errors import Conflict, FetchDeadline, MountFailed, VolumeError
from .request import PublishRequest
from .state import VolumeRecord, VolumeState
from .views import OVERLAY_SOURCE, Views, view_key
from .wants import PathWants

log = logging.getLogger(__name__)

PUBLISH_SECONDS = Histogram(
    "niphas_csi_publish_seconds",
    "NodePublishVolume time, from validated request to mounted target",
    ["outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 30, 120),
)


@dataclass
class FetchPolicy:
    timeout_s: float
    recheck_s: float


class Volumes:
    def __init__(
        self,
        *,
        state: VolumeState,
        leases: Leases,
        views: Views,
        closures: Closures,
        wants: PathWants | None,
        fetch: FetchPolicy,
    ) -> None:
        self.state = state
        self.leases = leases
        self.views = views
        self.closures = closures
        self._mesh_ready = asyncio.Event()
        self.wants = wants
        self.fetch = fetch
        self.records: dict[str, VolumeRecord] = {}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._view_lock = asyncio.Lock()

    @property
    def wants(self) -> PathWants | None:
        """How missing paths are asked of the mesh; None until the bus is connected."""
        return self._wants

    @wants.setter
    def wants(self, wants: PathWants | None) -> None:
        self._wants = wants
        if wants is None:
            self._mesh_ready.clear()
        else:
            self._mesh_ready.set()

    async def _mesh(self, missing: tuple[str, ...], timeout_s: float) -> PathWants:
        """The mesh to ask for `missing`, waiting (within the fetch deadline) for a bus that is
        still connecting: a driver that just started must not fail a pod it can serve."""
        if self.wants is None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._mesh_ready.wait(), timeout_s)
        if self.wants is None:
            raise FetchDeadline(
                f"not on this node, and the bus to ask the mesh did not connect within "
                f"{timeout_s:g} s: {', '.join(missing)}"
            )
        return self.wants

    @contextlib.asynccontextmanager
    async def _locked(self, volume_id: str) -> AsyncIterator[None]:
        lock = self._locks[volume_id]
        async with lock:
            yield
        if not lock.locked() and not lock._waiters:
            self._locks.pop(volume_id, None)

    # -- publish ------------------------------------------------------------------------------

    async def publish(self, request: PublishRequest, timeout_s: float | None = None) -> None:
        started = time.perf_counter()
        outcome = "error"
        # A span under the trace the volume attributes carry: the path.wanted published for
        # missing paths (and so the mesh's fetch) joins the trace that began at the push.
        parent = tracing.extract(
            {"traceparent": request.traceparent} if request.traceparent else {}
        )
        with tracing.tracer().start_as_current_span(
            "NodePublishVolume",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"csi.volume_id": request.volume_id, "csi.paths": len(request.store_paths)},
        ) as span:
            try:
                async with self._locked(request.volume_id):
                    await self._publish(request, timeout_s)
                outcome = "ok"
            except Exception as exc:
                span.set_status(Status(StatusCode.ERROR, repr(exc)))
                raise
            finally:
                PUBLISH_SECONDS.labels(outcome).observe(time.perf_counter() - started)

    async def _publish(self, request: PublishRequest, timeout_s: float | None) -> None:
        known = self.records.get(request.volume_id)
        if known is not None:
            if known.target != request.target or known.store_paths != request.store_paths:
                raise Conflict(
                    f"volume {request.volume_id} is already published at {known.target} with "
                    f"{', '.join(known.store_paths)}"
                )
            await self._ensure_mounted(known)  # the same call again: make sure, then OK
            return
        self.leases.take(request.volume_id, request.store_paths)
        try:
            closure = await self._present_closure(request, timeout_s)
            record = VolumeRecord(
                volume_id=request.volume_id,
                target=request.target,
                store_paths=request.store_paths,
                view=view_key(closure),
                closure=closure,
                pod=dict(request.pod),
            )
            await self._mount(record)
        except BaseException:
            self.leases.release(request.volume_id)
            raise
        try:
            self.state.save(record)
        except BaseException:
            await self._unmount(record)
            self.leases.release(request.volume_id)
            raise
        self.records[record.volume_id] = record
        log.info(
            "published %s at %s: %d paths (pod %s/%s)", record.volume_id, record.target,
            len(record.closure), record.pod.get("namespace", "-"), record.pod.get("name", "-"),
        )  # fmt: skip

    async def _present_closure(
        self, request: PublishRequest, timeout_s: float | None
    ) -> tuple[str, ...]:
        for other in self.records.values():
            # Another volume of the same paths is mounted: its lease keeps that closure valid,
            # and a closure never changes, so there is nothing to ask the store.
            if other.store_paths == request.store_paths and other.view in self.views.mounted:
                return other.closure
        presence = await self.closures.presence(request.store_paths)
        if not presence.missing:
            return presence.closure

        async def still_missing(paths: list[str] | tuple[str, ...]) -> tuple[str, ...]:
            return (await self.closures.presence(list(paths))).missing

        limit = self.fetch.timeout_s if timeout_s is None else min(timeout_s, self.fetch.timeout_s)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        wants = await self._mesh(presence.missing, limit)
        await wants.fetch(
            presence.missing,
            requester=f"csi:{request.volume_id}",
            timeout_s=max(deadline - loop.time(), 0.1),
            binary_cache=request.binary_cache,
            binary_cache_public_key=request.binary_cache_public_key,
            still_missing=still_missing,  # type: ignore[arg-type]
            recheck_s=self.fetch.recheck_s,
        )
        presence = await self.closures.presence(request.store_paths)
        if presence.missing:
            raise VolumeError(f"announced but not valid in the store: {presence.missing}")
        return presence.closure

    async def _mount(self, record: VolumeRecord) -> None:
        async with self._view_lock:
            await asyncio.to_thread(self._acquire_and_bind, record)

    def _acquire_and_bind(self, record: VolumeRecord) -> None:
        """In one thread (one hop off the loop per publish): the view, then the target."""
        view = self.views.acquire(record.view, record.closure)
        try:
            _bind_target(view, Path(record.target))
        except BaseException:
            self.views.release(record.view)
            raise

    async def _ensure_mounted(self, record: VolumeRecord) -> None:
        if mounts.is_mountpoint(record.target):
            return
        log.warning("volume %s: target %s was not mounted; mounting again", record.volume_id,
                    record.target)  # fmt: skip
        async with self._view_lock:
            view = await asyncio.to_thread(self.views.ensure, record.view, record.closure)
        await asyncio.to_thread(_bind_target, view, Path(record.target))

    # -- unpublish ----------------------------------------------------------------------------

    async def unpublish(self, volume_id: str, target: str) -> None:
        async with self._locked(volume_id):
            record = self.records.get(volume_id)
            if record is None or record.target != target:
                # Unknown here (already unpublished, or never ours): succeed, but never leave
                # one of our mounts behind at the target.
                await asyncio.to_thread(_unmount_target, Path(target), True)
                return
            await self._unmount(record)
            self.state.delete(volume_id)
            self.leases.release(volume_id)
            self.records.pop(volume_id, None)
            log.info("unpublished %s from %s", volume_id, target)

    async def _unmount(self, record: VolumeRecord) -> None:
        await asyncio.to_thread(_unmount_target, Path(record.target), False)
        async with self._view_lock:
            await asyncio.to_thread(self.views.release, record.view)

    # -- start --------------------------------------------------------------------------------

    async def reconcile(self) -> None:
        """After a restart: records say what kubelet believes is published. Keep their leases
        and remount what is missing; drop leases no record explains (a publish that crashed
        half-way) and views no record uses."""
        self.views.prepare()
        self.records = self.state.load()
        for volume_id in self.leases.volumes() - set(self.records):
            log.info("releasing the orphaned lease of %s", volume_id)
            self.leases.release(volume_id)
        self.views.refs = {}
        for record in self.records.values():
            self.leases.take(record.volume_id, record.store_paths)
            self.views.refs[record.view] = self.views.refs.get(record.view, 0) + 1
        for key in set(self.views.mounted) - set(self.views.refs):
            self.views.teardown(key)
        for record in list(self.records.values()):
            try:
                await self._ensure_mounted(record)
            except (OSError, VolumeError) as exc:
                log.error("volume %s cannot be mounted again: %s", record.volume_id, exc)


def _bind_target(view: Path, target: Path) -> None:
    """Bind the view at the target: recursive (a view may hold file binds), then read-only,
    nosuid, nodev on this mount too. The view is already all of that in the private staging
    area, so the copies a shared kubelet dir propagates are read-only from birth."""
    try:
        target.mkdir()  # kubelet leaves it to us: a directory just made holds no mount
    except FileExistsError:
        if mounts.is_mountpoint(target):
            return
    try:
        mounts.mount(view, target, None, mounts.MS_BIND | mounts.MS_REC)
        mounts.mount("none", target, None, mounts.MS_REMOUNT | mounts.MS_BIND | mounts.READ_ONLY)
    except OSError as exc:
        with contextlib.suppress(OSError):
            if mounts.is_mountpoint(target):
                mounts.umount(target, lazy=True)
        raise MountFailed(f"cannot mount the view at {target}: {exc.strerror}") from exc


def _unmount_target(target: Path, only_views: bool) -> None:
    """Unmount everything stacked at `target` (with `only_views`: only mounts of our views,
    for a volume we hold no record of) and remove the directory we created."""
    try:
        if only_views:
            while stacked := mounts.mounted_at(target):
                if stacked[-1].source != OVERLAY_SOURCE:
                    return
                mounts.umount(target)
        else:
            # Our own volume: unmount until the kernel says nothing is mounted there, without
            # reading the node's whole mount table.
            while mounts.umount_if_mounted(target):
                pass
    except OSError as exc:
        raise MountFailed(f"cannot unmount {target}: {exc.strerror}") from exc
    try:
        os.rmdir(target)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if not only_views:  # a directory of someone else's is left alone
            raise MountFailed(f"cannot remove {target}: {exc.strerror}") from exc
