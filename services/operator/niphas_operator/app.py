"""Wiring of the operator: settings -> bus, Kubernetes client, leader election, controller
(cluster mode) or the renderer (render mode, no cluster configured). Nothing is created at
import time."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from niphas_common.bus.bus import Bus
from niphas_common.bus.consumer import Subscription
from niphas_common.bus.topology import ConsumerSpec
from niphas_common.http import serve_ops
from niphas_common.service import ServiceSpec
from niphas_common.settings import NatsSettings
from niphas_common.tracing import setup_tracing
from niphas_operator.children import PodSettings
from niphas_operator.cluster import api_client
from niphas_operator.controller import Controller
from niphas_operator.kube import Kube
from niphas_operator.leader import LeaderElector
from niphas_operator.reconciler import Reconciler
from niphas_operator.render import Renderer
from niphas_operator.rollback import rollback_command
from niphas_operator.settings import OperatorSettings
from niphas_schemas import BuildDone

log = logging.getLogger(__name__)


def pod_settings(settings: OperatorSettings) -> PodSettings:
    key, _, value = settings.store_node_label.partition("=")
    return PodSettings(settings.stub_image, settings.csi_driver, (key, value))


async def run(settings: OperatorSettings, nats: NatsSettings, stop: asyncio.Event) -> None:
    """The operator until `stop`: cluster mode when a cluster is configured, else render mode."""
    setup_tracing("operator")
    bus = await Bus.connect(nats, name=f"operator-{settings.identity}")
    try:
        client = await api_client(settings.kubeconfig)
        if client is None:
            log.info("no cluster configured: rendering to %s", settings.resolved_render_dir())
            await _render(settings, bus, stop)
            return
        async with client:
            await _reconcile(settings, bus, Kube(client, settings.field_manager), stop)
    finally:
        await bus.close()


async def _reconcile(settings: OperatorSettings, bus: Bus, kube: Kube, stop: asyncio.Event) -> None:
    pdb_version = "policy/v1" if await kube.served("policy/v1") else "policy/v1beta1"
    reconciler = Reconciler(
        kube,
        bus.publish,
        pod_settings(settings),
        pdb_api_version=pdb_version,
        preheat_nodes=settings.preheat_nodes,
        preheat_deadline_s=settings.preheat_deadline_s,
    )
    controller = Controller(kube, bus, reconciler, settings)
    elector = LeaderElector(
        kube,
        namespace=settings.lease_namespace,
        name=settings.lease_name,
        identity=settings.identity,
        lease_duration_s=settings.lease_duration_s,
        renew_period_s=settings.renew_period_s,
    )

    async def readiness() -> str | None:
        return None if bus.nc.is_connected else "not connected to NATS"

    ops = None
    if settings.metrics_port is not None:
        ops = await serve_ops(settings.metrics_host, settings.metrics_port, readiness)
    try:
        await elector.run(stop, controller.lead)
    finally:
        if ops is not None:
            await ops.cleanup()


async def _render(settings: OperatorSettings, bus: Bus, stop: asyncio.Event) -> None:
    renderer = Renderer(
        settings.resolved_workloads_dir(),
        settings.resolved_render_dir(),
        pod_settings(settings),
        bus.publish,
    )

    async def readiness() -> str | None:
        return None if bus.nc.is_connected else "not connected to NATS"

    ops = None
    if settings.metrics_port is not None:
        ops = await serve_ops(settings.metrics_host, settings.metrics_port, readiness)
    try:
        await renderer.render_all()
        spec = ConsumerSpec(durable=f"{settings.build_consumer}-render", subject=BuildDone.subject)
        await bus.serve([Subscription(BuildDone, spec, renderer.on_build_done)], stop)
    finally:
        if ops is not None:
            await ops.cleanup()


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
