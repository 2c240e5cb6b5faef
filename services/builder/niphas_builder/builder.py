"""eval.done -> build.done: the builder's handler.

Every eval.done gets its own build.done per attribute, also when its derivation was built for
another one (the same commit pushed to another ref, or pushed again): that one is `cached`.
For each successfully evaluated attribute, in this order:
1. a result another builder recorded for the derivation moments ago is reused (so a
   redelivered eval.done publishes the very same build.done, which the stream de-duplicates;
   for another eval.done it is `cached`);
2. when the cache holds every output's closure with a trusted signature: `cached`, no build;
3. otherwise it waits for a build slot (`max_parallel_builds`); a newer commit of the same ref
   arriving meanwhile supersedes it (published as failed: "superseded by <commit>"); one
   arriving while it builds cancels the build (`cancel_superseded`), unless the newer commit
   or another push waiting here needs the same derivation (failed: "superseded by <commit>:
   cancelled while building"; builders elsewhere waiting for it build it themselves);
4. single-flight: the lease holder builds through the executor and pushes the closure,
   everyone else waiting on the same derivation gets its result;
5. `build.done` (and `path.available` for every pushed path, holder: the cache).
A build failure is an answer (one failed build.done, acked); trouble reaching NATS, the cache
or the executor's machinery is a `TransientError`, retried with backoff.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Iterable

from niphas_common.bus.build_logs import BuildLogs
from niphas_common.bus.bus import Bus
from niphas_common.bus.consumer import Delivery, Subscription
from niphas_common.bus.topology import ConsumerSpec
from niphas_common.errors import TransientError
from niphas_schemas import EvalDone, EvaluatedAttribute, PathAvailable

from .build_log import LogWriter
from .cache import BuildCache
from .executor import BuildJob, Executor
from .metrics import BUILD_SECONDS, BUILDS, CANCELLED, PATHS_PUSHED, PUSHES, RESULTS
from .result import BuildResult, built_outputs, log_tail, sorted_paths
from .settings import BuilderSettings
from .single_flight import SingleFlight
from .supersede import RefHeads

log = logging.getLogger(__name__)


class Superseded(Exception):
    """A running build was cancelled: a newer push of its ref made it pointless."""

    def __init__(self, newer: str) -> None:
        super().__init__(f"superseded by {newer}")
        self.newer = newer


class Builder:
    def __init__(
        self,
        bus: Bus,
        settings: BuilderSettings,
        cache: BuildCache,
        executor: Executor,
        flight: SingleFlight,
        heads: RefHeads | None,
        logs: BuildLogs | None = None,
    ) -> None:
        self.bus = bus
        self.settings = settings
        self.cache = cache
        self.executor = executor
        self.flight = flight
        self.heads = heads
        self.logs = logs
        self._slots = asyncio.Semaphore(settings.max_parallel_builds)
        self._askers: dict[str, dict[str, EvalDone]] = {}
        """Per derivation hash: the evaluations handled here that wait for its build."""

    def subscription(self) -> Subscription[EvalDone]:
        spec = ConsumerSpec(
            durable=self.settings.durable,
            subject=EvalDone.subject,
            ack_wait_s=self.settings.ack_wait_s,
            max_deliver=self.settings.max_deliver,
        )
        return Subscription(EvalDone, spec, self.handle, concurrency=self.settings.concurrency)

    async def handle(self, event: EvalDone, delivery: Delivery) -> None:
        if event.status != "succeeded":
            log.info(
                "evaluation of %s at %s failed; nothing to build", event.repository, event.commit
            )
            return
        # The ref's head is recorded while the attributes are looked up: a cached answer
        # does not wait for it, a build does (its supersede checks read the heads).
        recorded = asyncio.ensure_future(self._record_head(event))
        attrs = [a for a in event.attributes if a.drv_path is not None and a.error is None]
        # A redelivery may follow a first attempt whose announcements were not stored.
        redelivered = delivery.num_delivered > 1
        try:
            outcomes = await asyncio.gather(
                *(self._attribute(event, attr, recorded, redelivered) for attr in attrs),
                return_exceptions=True,
            )
            await recorded
        finally:
            recorded.cancel()  # only if this handler is itself cancelled before it is done
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        if errors:
            # Retried as a whole; attributes already answered publish the same build.done
            # again (a duplicate Msg-Id) or `cached`.
            transient = [e for e in errors if isinstance(e, TransientError)]
            raise (transient or errors)[0]

    async def _record_head(self, event: EvalDone) -> None:
        if self.heads is not None:
            await self.heads.record(event)

    async def _attribute(
        self,
        event: EvalDone,
        attr: EvaluatedAttribute,
        recorded: Awaitable[None],
        redelivered: bool,
    ) -> None:
        assert attr.drv_path is not None
        job = BuildJob(
            drv_path=attr.drv_path,
            outputs=dict(attr.outputs),
            attribute=attr.attribute,
            repository=event.repository,
            commit=event.commit,
            locked_flake_ref=event.locked_flake_ref,
            attr_path=attr.attr_path,
        )
        source = "shared"
        result = await self.flight.peek(job.drv_hash, event.event_id)
        if result is None:
            result, source = await self.cache.lookup(job.outputs), "cache"
        if result is None:
            await recorded
            result, source = await self._queued(event, job)
        elif redelivered and result.status != "failed" and not self.executor.pushes:
            # The build that answered may have pushed and then failed to announce (a
            # publish not stored while a NATS cluster elected a leader); the attempt
            # that failed is this one, so it announces again before answering.
            await self._announce_cached(job)
        RESULTS.labels(result.status, source).inc()
        await self.bus.publish(result.to_event(event, attr, self.cache.read_url))

    async def _queued(self, event: EvalDone, job: BuildJob) -> tuple[BuildResult, str]:
        async with self._slots:
            if self.settings.supersede and self.heads is not None:
                newer = await self.heads.superseded_by(event)
                if newer is not None:
                    log.info("%s of %s superseded by %s", job.drv_path, event.commit, newer)
                    return BuildResult.failed(f"superseded by {newer}", self.settings.name), (
                        "superseded"
                    )
            ran = False

            async def build() -> BuildResult:
                nonlocal ran
                ran = True
                return await self._cancellable(job)

            askers = self._askers.setdefault(job.drv_hash, {})
            askers[event.event_id] = event
            try:
                result = await self.flight.run(
                    job.drv_hash,
                    event.event_id,
                    build,
                    lambda: self.cache.lookup(job.outputs),
                    timeout_s=self.settings.build_timeout_s * 2,
                )
            except Superseded as exc:
                tail = f"superseded by {exc.newer}: cancelled while building"
                return BuildResult.failed(tail, self.settings.name), "cancelled"
            finally:
                askers.pop(event.event_id, None)
                if not askers:
                    self._askers.pop(job.drv_hash, None)
            return result, "executor" if ran else "shared"

    async def _cancellable(self, job: BuildJob) -> BuildResult:
        """`_build`, cancelled (`Superseded`) once every push waiting for it here was
        overtaken by a newer push of its ref that does not need the derivation."""
        if not (self.settings.supersede and self.settings.cancel_superseded and self.heads):
            return await self._build(job)
        building = asyncio.create_task(self._build(job), name=f"build {job.drv_hash}")
        watcher = asyncio.create_task(self._watch(job, building), name=f"watch {job.drv_hash}")
        try:
            return await building
        except asyncio.CancelledError:
            if watcher.done() and not watcher.cancelled() and (newer := watcher.result()):
                await self.executor.cancel(job)
                raise Superseded(newer) from None
            raise
        finally:
            watcher.cancel()

    async def _watch(self, job: BuildJob, building: asyncio.Task[BuildResult]) -> str | None:
        while not building.done():
            await asyncio.sleep(self.settings.cancel_check_s)
            newer = await self._pointless(job)
            if newer is not None and not building.done():
                log.info("cancelling the build of %s: superseded by %s", job.drv_path, newer)
                CANCELLED.inc()
                building.cancel()
                return newer
        return None

    async def _pointless(self, job: BuildJob) -> str | None:
        """The newer commit, when every push waiting here for `job` was superseded by a head
        that does not need its derivation; None while any push still needs it."""
        assert self.heads is not None
        newer = None
        for event in list(self._askers.get(job.drv_hash, {}).values()):
            head = await self.heads.superseding(event)
            if head is None or head.drvs is None or job.drv_hash in head.drvs:
                return None
            newer = head.commit
        return newer

    async def _build(self, job: BuildJob) -> BuildResult:
        """Build and push as the lease holder."""
        log.info("build started: %s (%s of %s)", job.drv_path, job.attribute, job.commit)
        started = time.monotonic()
        writer = None
        if self.logs is not None:
            writer = LogWriter(self.logs, job.drv_hash, self.settings.log_max_bytes)
            await writer.start()
        try:
            outcome = await self.executor.realise(job, writer.feed if writer else None)
        except TransientError as exc:
            BUILDS.labels("error").inc()
            if writer is not None:
                await writer.finish("error", note=f"the build did not run to its end: {exc}")
            raise
        except asyncio.CancelledError:
            if writer is not None:
                await asyncio.shield(writer.finish("cancelled", note="build cancelled"))
            raise
        elapsed = time.monotonic() - started
        BUILD_SECONDS.observe(elapsed)
        if writer is not None:
            await writer.finish("built" if outcome.succeeded else "failed", outcome.log)
        if not outcome.succeeded:
            BUILDS.labels("failed").inc()
            log.warning("build failed: %s", job.drv_path)
            tail = log_tail(outcome.log, self.settings.log_tail_lines)
            return BuildResult.failed(tail, outcome.built_on, elapsed)
        BUILDS.labels("built").inc()
        if self.executor.pushes:
            pushed = await self.cache.lookup(job.outputs)
            if pushed is None:
                tail = log_tail(outcome.log, self.settings.log_tail_lines)
                return BuildResult.failed(
                    f"{tail}\nthe build succeeded but the cache lacks its closure",
                    outcome.built_on,
                    elapsed,
                )
            outputs, closure = pushed.outputs, pushed.closure
        else:
            infos = await self.cache.push(job.outputs.values())
            PUSHES.inc()
            PATHS_PUSHED.inc(len(infos))
            log.info(
                "push done: %s (%d paths to %s)", job.drv_path, len(infos), self.cache.push_url
            )
            await self._announce(
                (str(i.path), i.nar_hash.nix32, i.nar_size, [str(r) for r in i.references])
                for i in infos.values()
            )
            outputs, closure = built_outputs(job.outputs, infos), sorted_paths(infos)
        return BuildResult(
            status="built",
            outputs=outputs,
            closure=closure,
            built_on=outcome.built_on,
            duration_s=time.monotonic() - started,
        )

    async def _announce_cached(self, job: BuildJob) -> None:
        """path.available again for the closure of `job`'s outputs, read from the cache."""
        infos = await self.cache.closure(job.outputs)
        await self._announce(
            (str(i.store_path), i.nar_hash.nix32, i.nar_size, [str(r) for r in i.references])
            for i in infos
        )

    async def _announce(self, paths: Iterable[tuple[str, str, int, list[str]]]) -> None:
        """path.available for each pushed path: the mesh learns the cache holds it."""
        for path, nar_hash, nar_size, refs in paths:
            await self.bus.publish(
                PathAvailable(
                    holder_kind="cache",
                    holder="cache",
                    holder_url=self.cache.read_url,
                    store_path=path,
                    nar_hash=nar_hash,
                    nar_size=nar_size,
                    references=tuple(refs),
                )
            )
