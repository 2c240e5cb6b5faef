"""Leader election through a coordination.k8s.io Lease, so several replicas can run and only
one reconciles.

The holder renews the Lease every `renew_period`; a standby takes it over once it has seen
the same Lease (same resourceVersion) unchanged for `lease_duration` by its own clock, so
clock skew between machines does not matter. Every write carries the resourceVersion it was
based on: two standbys racing for an expired Lease get one 200 and one 409. A leader that
cannot renew within the duration stops leading before another can start. On a clean stop the
leader releases the Lease, so a successor takes over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from prometheus_client import Gauge

from niphas_common.kube.client import Kube, KubeConflict, KubeError, collection_path

log = logging.getLogger(__name__)

IS_LEADER = Gauge("niphas_operator_leader", "1 while this replica holds the leader Lease")

Lead = Callable[[asyncio.Event], Coroutine[Any, Any, None]]
"""Runs while leading; must return soon after the event (leadership lost or stop) is set."""


def _micro_time() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(
        self,
        kube: Kube,
        *,
        namespace: str,
        name: str,
        identity: str,
        lease_duration_s: float,
        renew_period_s: float,
    ) -> None:
        self._kube = kube
        self._path = collection_path("coordination.k8s.io/v1", "Lease", namespace)
        self._namespace = namespace
        self._name = name
        self.identity = identity
        self._duration = lease_duration_s
        self._period = renew_period_s
        self._observed: tuple[str, float] | None = None
        """(resourceVersion, monotonic time first seen) of another holder's Lease."""
        self.leading = False
        self.running = False
        self.unreachable: str | None = "no Lease request made yet"
        """Why the last Lease request did not reach the API server; None when it did."""

    def not_ready(self) -> str | None:
        """None while electing with the API server answering (leader or standby)."""
        if not self.running:
            return "leader election not running"
        if self.unreachable is not None:
            return f"API server unreachable: {self.unreachable}"
        return None

    async def run(self, stop: asyncio.Event, lead: Lead) -> None:
        """Campaign until `stop`; run `lead` for each term this replica wins."""
        self.running = True
        try:
            while not stop.is_set():
                if await self._try_acquire_or_renew():
                    await self._lead(stop, lead)
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self._period)
        finally:
            self.running = False
        await self._release()

    async def _lead(self, stop: asyncio.Event, lead: Lead) -> None:
        log.info("%s leads (Lease %s/%s)", self.identity, self._namespace, self._name)
        self.leading = True
        IS_LEADER.set(1)
        lost = asyncio.Event()
        task = asyncio.create_task(lead(lost))
        last_renewal = time.monotonic()
        try:
            while not stop.is_set() and not task.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self._period)
                if stop.is_set():
                    break
                if await self._try_acquire_or_renew():
                    last_renewal = time.monotonic()
                elif time.monotonic() - last_renewal > self._duration * 0.8 or not self.leading:
                    log.warning("%s lost the leader Lease", self.identity)
                    break
        finally:
            lost.set()
            try:
                await asyncio.wait_for(task, timeout=30)
            except TimeoutError:
                task.cancel()
            finally:
                self.leading = False
                IS_LEADER.set(0)
        if task.done() and not task.cancelled() and task.exception() is not None:
            # Campaign again (after a pause) rather than leave the service half-dead.
            log.error("leading failed", exc_info=task.exception())
            await asyncio.sleep(self._period)

    async def _try_acquire_or_renew(self) -> bool:
        try:
            won = await self._acquire_or_renew()
        except KubeConflict:
            self.unreachable = None
            self.leading = False
            return False
        except KubeError as exc:
            self.unreachable = str(exc)[:200]
            log.warning("leader election: %s", exc)
            return False
        self.unreachable = None
        return won

    async def _acquire_or_renew(self) -> bool:
        """One Lease read and, unless another holder's Lease is still valid, one write."""
        lease = await self._kube.get(f"{self._path}/{self._name}")
        now = _micro_time()
        if lease is None:
            await self._kube.create(self._path, self._lease(now, now, 0, None))
            return True
        spec: dict[str, Any] = lease.get("spec") or {}
        holder = spec.get("holderIdentity")
        rv = lease["metadata"]["resourceVersion"]
        if holder == self.identity:
            body = self._lease(spec.get("acquireTime") or now, now, 0, lease)
            await self._kube.request("PUT", f"{self._path}/{self._name}", body=body)
            return True
        if holder and not self._expired(rv):
            self.leading = False
            return False
        transitions = int(spec.get("leaseTransitions") or 0) + 1
        body = self._lease(now, now, transitions, lease)
        await self._kube.request("PUT", f"{self._path}/{self._name}", body=body)
        return True

    def _expired(self, resource_version: str) -> bool:
        now = time.monotonic()
        if self._observed is None or self._observed[0] != resource_version:
            self._observed = (resource_version, now)
            return False
        return now - self._observed[1] > self._duration

    def _lease(
        self, acquired: str, renewed: str, transitions: int, current: dict[str, Any] | None
    ) -> dict[str, Any]:
        metadata: dict[str, Any] = {"name": self._name, "namespace": self._namespace}
        spec: dict[str, Any] = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self._duration)),
            "acquireTime": acquired,
            "renewTime": renewed,
        }
        if current is not None:
            metadata["resourceVersion"] = current["metadata"]["resourceVersion"]
            spec["leaseTransitions"] = transitions or int(
                (current.get("spec") or {}).get("leaseTransitions") or 0
            )
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": spec,
        }

    async def _release(self) -> None:
        """Hand the Lease back so a standby need not wait for it to expire."""
        try:
            lease = await self._kube.get(f"{self._path}/{self._name}")
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            lease["spec"]["holderIdentity"] = None
            lease["spec"]["leaseDurationSeconds"] = 1
            await self._kube.request("PUT", f"{self._path}/{self._name}", body=lease)
        except KubeError as exc:
            log.warning("leader election: could not release the Lease: %s", exc)
