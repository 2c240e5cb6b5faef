"""Wiring of the operator: its service runtime (tracing, bus, readiness, ops server), the
workload store (the cluster's when one is configured, else the files of render mode), the one
reconciler and the controller over it, leader election in a cluster. Nothing is created at
import time."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from niphas_common.bus.bus import Bus
from niphas_common.http import Readiness
from niphas_common.kube.client import Kube
from niphas_common.kube.config import connect
from niphas_common.kube.watch import Backoff
from niphas_common.service import ServiceRuntime, ServiceSpec, running
from niphas_common.settings import NatsSettings
from niphas_operator.controller import Controller
from niphas_operator.file_store import FileStore
from niphas_operator.kubernetes_store import KubernetesStore, count_request
from niphas_operator.leader import LeaderElector
from niphas_operator.reconciler import Reconciler
from niphas_operator.rollback import rollback_command
from niphas_operator.settings import OperatorSettings
from niphas_operator.store import WorkloadStore

log = logging.getLogger(__name__)


async def run(settings: OperatorSettings, nats: NatsSettings, stop: asyncio.Event) -> None:
    """The operator until `stop`: on the cluster when one is configured, else render mode."""
    async with running(
        "operator", settings, nats, instance=settings.identity, stop=stop
    ) as runtime:
        kube = await connect(
            settings.kubeconfig,
            settings.field_manager,
            count=count_request,
            compressed=settings.api_compression,
        )
        if kube is None:
            log.info("no cluster configured: rendering to %s", settings.resolved_render_dir())
            await _run_on_files(settings, runtime.bus, stop)
            return
        async with kube:
            await _run_on_cluster(settings, runtime, kube, stop)


def reconciler(settings: OperatorSettings, store: WorkloadStore, bus: Bus) -> Reconciler:
    return Reconciler(
        store,
        bus.publish,
        settings.pod(),
        preheat_nodes=settings.preheat_nodes,
        preheat_deadline_s=settings.preheat_deadline_s,
    )


async def _run_on_cluster(
    settings: OperatorSettings, runtime: ServiceRuntime, kube: Kube, stop: asyncio.Event
) -> None:
    elector = LeaderElector(
        kube,
        namespace=settings.lease_namespace,
        name=settings.lease_name,
        identity=settings.identity,
        lease_duration_s=settings.lease_duration_s,
        renew_period_s=settings.renew_period_s,
    )
    runtime.ready_when(_electing(elector))
    retry = Backoff(settings.retry_base_s, settings.retry_max_s)
    store = await KubernetesStore.connect(
        kube, namespace=settings.namespace, resync_s=settings.resync_s, retry=retry
    )
    controller = Controller(store, runtime.bus, reconciler(settings, store, runtime.bus), settings)
    await elector.run(stop, controller.lead)


def _electing(elector: LeaderElector) -> Readiness:
    """Ready while leader election runs and its last request reached the API server (a
    standby is ready: it takes over when the leader goes)."""

    async def check() -> str | None:
        return elector.not_ready()

    return check


async def _run_on_files(settings: OperatorSettings, bus: Bus, stop: asyncio.Event) -> None:
    """Render mode: one process (no leader election; `niphas rollback` writes under the
    store's lock). Its durable consumers are its own, so a cluster's operator on the same
    NATS never shares their messages."""
    store = FileStore.from_settings(settings)
    own = settings.model_copy(
        update={
            "build_consumer": f"{settings.build_consumer}-render",
            "eval_consumer": f"{settings.eval_consumer}-render",
        }
    )
    controller = Controller(store, bus, reconciler(settings, store, bus), own)
    await controller.lead(stop)


async def main(stop: asyncio.Event) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        await run(OperatorSettings(), NatsSettings(), stop)


service = ServiceSpec(
    name="operator",
    summary="Reconcile NiphasWorkloads into Deployments running their built closures.",
    main=main,
    extra_commands=(("rollback", rollback_command),),
    settings=(OperatorSettings,),
)
