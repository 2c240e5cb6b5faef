"""The evaluation worker: `push.received` -> `eval.done`, one per push, one evaluation per
(repository, commit).

Per event: allowlist (deny: one failed eval.done, acked) -> the commit (the push's `after`;
when absent, the ref's head now, resolved with `git ls-remote`) -> claim (repository, commit)
in the results bucket -> `nix eval` at that commit -> publish the eval.done -> mark the claim
published, keeping the eval.done. The eval.done's `pushed_at` is the push's `occurred_at`, or
the moment the ref's head was resolved, so the operator can tell the newer of two commits of one
ref whatever order their results arrive in.

A commit pushed again (to another ref, as a fast-forward merge does, or back to a ref that had
it, as a revert by push does) is not evaluated again: its kept eval.done is published for this
push (its push event, ref and push time), failed ones stay failed. While another push's worker
is evaluating the commit, this one waits for that result (the claim turns stale if that worker
dies, and is then taken over). A redelivered push publishes the same eval.done again (same
Msg-Id, stored once); the push that evaluated the commit publishes nothing more.

Failures of the flake itself (syntax, missing attribute, a throw everywhere, timeout, memory)
are results: a failed eval.done, acked, never redelivered. Only an unreachable repository or
bus is a `TransientError` (nak, redelivered with backoff); on the last allowed delivery the
push gets a failed eval.done instead, so no event loops or disappears silently.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from datetime import UTC, datetime

from niphas_common.bus.bus import Bus
from niphas_common.bus.consumer import Delivery, Subscription
from niphas_common.bus.topology import ConsumerSpec
from niphas_eval.drv_upload import DerivationUpload, UploadFailed
from niphas_eval.evaluator import EvalTransient, Evaluation, Evaluator, ResolveError
from niphas_eval.flakeref import Allowlist, UnusableRepository, git_url, with_ref
from niphas_eval.forges.base import ZERO_COMMIT
from niphas_eval.metrics import DRV_UPLOADS, EVAL_SECONDS, EVALUATIONS, EVALUATIONS_SKIPPED
from niphas_eval.results import Claim, Record, ResultStore, result_key
from niphas_schemas import EvalDone, PushReceived

log = logging.getLogger(__name__)

BUSY_POLL_S = 0.25
"""Seconds between looks at a commit another worker is evaluating: a KV read is cheap, an
evaluation takes seconds."""


LOG_ERROR_CHARS = 300
"""Characters of an evaluation's error that reach the log: its first line, cut. The text comes
from the pushed code (a `throw` message), so the log keeps a bounded headline; the whole
bounded stderr tail goes only into the failed eval.done."""


def headline(error: str) -> str:
    first = error.strip().splitlines()[0] if error.strip() else ""
    return first if len(first) <= LOG_ERROR_CHARS else first[:LOG_ERROR_CHARS] + "..."


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class EvalWorker:
    def __init__(
        self,
        bus: Bus,
        evaluator: Evaluator,
        allowlist: Allowlist,
        results: ResultStore,
        spec: ConsumerSpec,
        *,
        concurrency: int,
        upload: DerivationUpload | None = None,
    ) -> None:
        self._bus = bus
        self._upload = upload
        self._evaluator = evaluator
        self._allowlist = allowlist
        self._results = results
        self.spec = spec
        self.concurrency = concurrency
        self.evaluated: list[tuple[str, str]] = []
        """(repository, commit) this worker ran `nix eval` for (tests and benchmarks read it)."""

    def subscription(self) -> Subscription[PushReceived]:
        return Subscription(PushReceived, self.spec, self.handle, concurrency=self.concurrency)

    async def handle(self, push: PushReceived, delivery: Delivery) -> None:
        last_try = delivery.num_delivered >= self.spec.max_deliver
        refusal = self._refusal(push.repository)
        if refusal is not None:
            await self._publish_failure(push, push.commit or ZERO_COMMIT, refusal, "disallowed")
            return
        commit, ref, pushed_at = push.commit, push.ref, push.occurred_at
        if commit is None:
            # The head is the one seen now, so it is as new as this moment (taken before
            # asking: any push made after the answer is then later still).
            pushed_at = datetime.now(UTC)
            try:
                commit, ref = await self._evaluator.resolve(push.repository, push.ref)
            except ResolveError as exc:
                await self._publish_failure(push, ZERO_COMMIT, str(exc), "no-such-ref")
                return
            except EvalTransient as exc:
                if not last_try:
                    raise
                await self._publish_failure(push, ZERO_COMMIT, f"gave up: {exc}", "unreachable")
                return
            log.info("%s %s resolved to %s", push.repository, ref or "HEAD", commit)
        await self._evaluate_once(push, commit, ref, pushed_at, last_try)

    def _refusal(self, repository: str) -> str | None:
        try:
            git_url(repository)
        except UnusableRepository as exc:
            return str(exc)
        if not self._allowlist.allows(repository):
            return self._allowlist.reason(repository)
        return None

    async def _evaluate_once(
        self,
        push: PushReceived,
        commit: str,
        ref: str | None,
        pushed_at: datetime,
        last_try: bool,
    ) -> None:
        key = result_key(push.repository, commit)
        claim = await self._claim(key, push, commit)
        if claim.outcome == "published" and claim.record is not None:
            await self._reuse(push, claim.record, ref, pushed_at)
            return
        try:
            evaluation = await self._run(push, commit, ref)
        except EvalTransient as exc:
            if not last_try:
                raise
            evaluation = Evaluation("failed", commit, error=f"gave up: {exc}", reason="unreachable")
        await self._upload_derivations(push, evaluation)
        done = self._fitting(self._eval_done(push, commit, ref, evaluation, pushed_at))
        await self._publish(done)
        if evaluation.reason == "unreachable":
            # Not a result of the commit: a later push (the forge back, credentials fixed)
            # fetches it again.
            await self._results.release(key)
            return
        published = Record("published", push.event_id, time.time(), self._results.worker, done)
        await self._results.record(key, published)

    async def _upload_derivations(self, push: PushReceived, evaluation: Evaluation) -> None:
        """Put the evaluated derivations where build pods find them, before eval.done names
        them. A failure costs only that: build pods then evaluate the flake themselves."""
        if self._upload is None or evaluation.status != "succeeded":
            return
        drvs = [a.drv_path for a in evaluation.attributes if a.drv_path is not None]
        try:
            await self._upload.upload(drvs)
        except UploadFailed as exc:
            DRV_UPLOADS.labels("failed").inc()
            log.warning("%s@%s: derivations not uploaded, build pods will evaluate the flake: "
                        "%s", push.repository, evaluation.commit, exc)  # fmt: skip
        else:
            DRV_UPLOADS.labels("uploaded").inc()

    async def _reuse(
        self, push: PushReceived, record: Record, ref: str | None, pushed_at: datetime
    ) -> None:
        """Answer `push` with the eval.done kept in `record`, unless it was that push's own."""
        if record.result is None or record.push_event_id == push.event_id:
            log.info("%s: this push's result is published already", push.repository)
            return
        EVALUATIONS_SKIPPED.labels("already-evaluated").inc()
        log.info(
            "%s@%s already evaluated: its result answers this push to %s",
            push.repository, record.result.commit, ref or "the default branch",
        )  # fmt: skip
        await self._publish(self._fitting(self._reused(push, record.result, ref, pushed_at)))

    async def _claim(self, key: str, push: PushReceived, commit: str) -> Claim:
        """Our claim on `key`, or its published result; while another push's worker is
        evaluating the commit, wait for that result (or for its claim to turn stale)."""
        waiting = False
        while True:
            claim = await self._results.claim(key, push.event_id)
            if claim.outcome != "busy":
                return claim
            if not waiting:
                waiting = True
                EVALUATIONS_SKIPPED.labels("in-progress-elsewhere").inc()
                holder = claim.record.worker if claim.record else "another worker"
                log.info(
                    "%s@%s is being evaluated by %s: waiting for its result",
                    push.repository, commit, holder,
                )  # fmt: skip
            await asyncio.sleep(BUSY_POLL_S)

    async def _run(self, push: PushReceived, commit: str, ref: str | None) -> Evaluation:
        self.evaluated.append((push.repository, commit))
        started = time.monotonic()
        evaluation = await self._evaluator.evaluate(push.repository, commit, ref)
        EVAL_SECONDS.observe(time.monotonic() - started)
        EVALUATIONS.labels(evaluation.status, evaluation.reason).inc()
        log.info(
            "%s@%s: %s in %.2fs (%d attributes)%s",
            push.repository, commit, evaluation.status, evaluation.duration_s,
            len(evaluation.attributes),
            f": {headline(evaluation.error)}" if evaluation.error else "",
        )  # fmt: skip
        return evaluation

    def _eval_done(
        self,
        push: PushReceived,
        commit: str,
        ref: str | None,
        evaluation: Evaluation,
        pushed_at: datetime,
    ) -> EvalDone:
        return EvalDone(
            push_event_id=push.event_id,
            repository=push.repository,
            ref=ref,
            commit=commit,
            pushed_at=pushed_at,
            locked_flake_ref=evaluation.locked_flake_ref,
            status=evaluation.status,
            attributes=evaluation.attributes,
            error=evaluation.error[:65536] if evaluation.error else None,
        )

    def _reused(
        self, push: PushReceived, stored: EvalDone, ref: str | None, pushed_at: datetime
    ) -> EvalDone:
        """The commit's stored eval.done as this push's own: its push, ref and push time."""
        locked = stored.locked_flake_ref
        if locked is not None:
            locked = with_ref(push.repository, locked, ref)
        fields = stored.model_dump(exclude={"event_id", "occurred_at"})
        return EvalDone.model_validate(
            {
                **fields,
                "push_event_id": push.event_id,
                "ref": ref,
                "pushed_at": pushed_at,
                "locked_flake_ref": locked,
            }
        )

    def _limit(self) -> int:
        """Largest message body the server takes, less room for headers."""
        return max(self._bus.max_payload - 4096, 4096)

    def _fitting(self, done: EvalDone) -> EvalDone:
        """`done`, or, when it exceeds the server's max_payload (thousands of attributes),
        a failed eval.done saying so: retrying could never publish it."""
        size = len(done.model_dump_json())
        if size <= self._limit():
            return done
        log.error("eval.done of %s@%s too large: %d bytes", done.repository, done.commit, size)
        error = (
            f"the result ({len(done.attributes)} attributes, {size} bytes) exceeds the NATS "
            f"server's max_payload ({self._bus.max_payload} bytes): split the flake's "
            "packages or raise max_payload"
        )
        return done.model_copy(update={"status": "failed", "attributes": (), "error": error})

    async def _publish_failure(
        self, push: PushReceived, commit: str, reason: str, kind: str
    ) -> None:
        EVALUATIONS.labels("failed", kind).inc()
        log.warning("%s: not evaluated: %s", push.repository, headline(reason))
        failed = Evaluation("failed", commit, error=reason)
        done = self._eval_done(push, commit, push.ref, failed, push.occurred_at)
        await self._publish(done)

    async def _publish(self, done: EvalDone) -> None:
        await self._bus.publish(done)
