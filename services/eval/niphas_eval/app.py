"""Wiring of the eval service: one place builds every client, nothing at import.

`niphas eval` runs the webhook ingress and the evaluation workers in one process (the
embedded default); `--role ingress` / `--role workers` run one half, as the two Deployments of
a cluster do (deploy/kustomize/base/eval/).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Annotated

import typer
import uvloop
from aiohttp import web

from niphas_common.bus.bus import Bus
from niphas_common.bus.topology import ConsumerSpec
from niphas_common.http import Readiness
from niphas_common.nix.runner import NixRunner
from niphas_common.service import ServiceRuntime, ServiceSpec, run_until_signalled
from niphas_common.settings import NatsSettings
from niphas_eval.credentials import GitCredentials
from niphas_eval.drv_upload import DerivationUpload
from niphas_eval.evaluator import Evaluator
from niphas_eval.flakeref import Allowlist
from niphas_eval.ingress import WebhookIngress
from niphas_eval.results import ResultStore
from niphas_eval.secrets import WebhookSecrets
from niphas_eval.settings import EvalSettings, Role
from niphas_eval.worker import EvalWorker, worker_name

log = logging.getLogger(__name__)


def consumer_spec(settings: EvalSettings) -> ConsumerSpec:
    return ConsumerSpec(
        durable=settings.durable,
        subject="push.received",
        ack_wait_s=settings.ack_wait_s,
        max_deliver=settings.max_deliver,
        backoff_s=(2.0, 10.0, 30.0, 60.0),
        # Fetching is bounded by each worker's concurrency; this only caps the whole group.
        max_ack_pending=max(64, settings.concurrency * 16),
    )


async def build_worker(
    bus: Bus, settings: EvalSettings, *, runner: NixRunner | None = None
) -> EvalWorker:
    allowlist = Allowlist(tuple(settings.allowed_refs))
    runner = runner or NixRunner()
    evaluator = Evaluator(
        runner,
        system=settings.system,
        work_dir=settings.state_dir / "eval",
        timeout_s=settings.eval_timeout_s,
        memory_limit_mb=settings.memory_limit_mb,
        stderr_tail_bytes=settings.stderr_tail_bytes,
        git_timeout_s=settings.git_timeout_s,
        allowlist=allowlist,
        allow_import_from_derivation=settings.allow_import_from_derivation,
        credentials=GitCredentials(settings.git_credentials_file),
    )
    results = await ResultStore.open(
        bus,
        settings.results_bucket,
        ttl_s=settings.results_ttl_days * 86400.0,
        replicas=bus.settings.replicas,
        worker=worker_name(),
        stale_after_s=settings.eval_timeout_s + 60.0,
    )
    return EvalWorker(
        bus,
        evaluator,
        allowlist,
        results,
        consumer_spec(settings),
        concurrency=settings.concurrency,
        upload=drv_upload(settings, runner),
    )


def drv_upload(settings: EvalSettings, runner: NixRunner) -> DerivationUpload | None:
    """Where evaluated derivations go for build pods (None: off, the builder shares the store)."""
    if settings.drv_upload_url is None:
        return None
    log.info("evaluated derivations are uploaded to %s", settings.drv_upload_url)
    return DerivationUpload(
        runner,
        settings.drv_upload_url,
        settings.drv_upload_token_file,
        work_dir=settings.state_dir / "eval",
        timeout_s=settings.drv_upload_timeout_s,
    )


def streams_ready(bus: Bus, settings: EvalSettings) -> Readiness:
    """Readiness beyond the connection: the streams this process publishes to answer."""
    subjects = ["push.received"]
    if settings.runs_workers:
        subjects.append("eval.done")

    async def check() -> str | None:
        for subject in subjects:
            if (reason := await bus.stream_available(subject)) is not None:
                return reason
        return None

    return check


async def run(settings: EvalSettings, nats: NatsSettings, stop: asyncio.Event) -> None:
    """The role's parts until `stop`. /readyz answers from the start (the webhook app, or the
    ops server), saying what is missing while NATS or the webhook secrets are not there."""
    runtime = ServiceRuntime("eval", nats, instance=settings.role)
    try:
        if settings.runs_ingress and settings.webhook_secrets_file is not None:
            runtime.requires_file(
                settings.webhook_secrets_file,
                "the Secret niphas-eval-webhooks (key secrets.yaml); until then every webhook "
                "is refused",
            )
        async with _ingress(runtime, settings):
            if not settings.runs_ingress:
                await runtime.serve_ops(settings)
            bus = await runtime.connect_retrying(stop)
            runtime.ready_when(streams_ready(bus, settings))
            if settings.runs_workers:
                worker = await build_worker(bus, settings)
                if not settings.allowed_refs:
                    log.warning("NIPHAS_EVAL_ALLOWED_REFS is empty: every push will be refused")
                await bus.serve([worker.subscription()], stop)
            else:
                await stop.wait()
    finally:
        await runtime.close()


@contextlib.asynccontextmanager
async def _ingress(runtime: ServiceRuntime, settings: EvalSettings) -> AsyncIterator[None]:
    """The webhook server (with the ops endpoints) while the role includes the ingress; it
    answers 503 until the bus is connected."""
    if not settings.runs_ingress:
        yield
        return
    secrets = WebhookSecrets(settings.webhook_secrets_file, settings.webhook_secrets)
    if not len(secrets) and settings.webhook_secrets_file is None:
        log.warning("no webhook secrets configured: every webhook will be refused")
    ingress = WebhookIngress(
        lambda: runtime.bus if runtime.has_bus else None,
        secrets,
        publish_timeout_s=settings.publish_timeout_s,
        read_timeout_s=settings.read_timeout_s,
    )
    site = web.AppRunner(
        ingress.app(runtime.readiness, max_body_bytes=settings.max_body_bytes),
        access_log=None,
        keepalive_timeout=settings.read_timeout_s,
    )
    await site.setup()
    try:
        await web.TCPSite(site, settings.listen_host, settings.listen_port).start()
        log.info("webhooks on http://%s/hooks/{github,gitea,gitlab}", settings.listen)
        yield
    finally:
        await site.cleanup()


async def main(stop: asyncio.Event) -> None:
    await run(EvalSettings(), NatsSettings(), stop)


def command(
    listen: Annotated[
        str | None,
        typer.Option("--listen", help="HOST:PORT for webhooks (default NIPHAS_EVAL_LISTEN)"),
    ] = None,
    role: Annotated[
        str | None,
        typer.Option("--role", help="all | ingress | workers (default NIPHAS_EVAL_ROLE)"),
    ] = None,
) -> None:
    """Forge webhooks -> push.received; flake evaluation workers -> eval.done."""
    overrides: dict[str, str] = {}
    if listen:
        overrides["listen"] = listen
    if role:
        if role not in Role.__args__:  # type: ignore[attr-defined]
            raise typer.BadParameter("one of all, ingress, workers", param_hint="--role")
        overrides["role"] = role
    settings = EvalSettings(**overrides)  # type: ignore[arg-type]
    loop_factory = uvloop.new_event_loop if settings.event_loop == "uvloop" else None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(run_until_signalled(lambda stop: run(settings, NatsSettings(), stop)))


service = ServiceSpec(
    name="eval",
    summary="Forge webhooks -> push.received; flake evaluation workers -> eval.done.",
    main=main,
    command=command,
    settings=(EvalSettings,),
)
