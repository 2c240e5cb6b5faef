"""The webhook server: POST /hooks/{github,gitea,gitlab} -> `push.received`.

Per request, nothing from the body is parsed before it is authenticated: the size (413), the
event and delivery headers (400) and the forge's proof header (401 when missing) come first;
then the body is read under READ_TIMEOUT_S (408 for a client that trickles or stalls); then
the proof is checked against every secret configured for that endpoint (a forge's HMAC of the
raw body, or GitLab's token; 401 when none matches). Only then is the payload parsed (400 for
any malformed shape) and the repository it names checked against the entries whose secret
verified it (403 for any other repository): what is published (the repository, its clone URL,
the forge) comes from that entry. A push is answered 202 only once JetStream acknowledged the
`push.received`, whose `delivery_id` (hence `Nats-Msg-Id`) is what the push means
(`push-<digest of repository, ref, before, after>`; the forge's own delivery id is logged and
answered): a redelivery, or a captured body replayed under a new delivery id or another
forge's headers, is stored once (still 202, with `duplicate: true`). When the bus is down or
slow the answer is 503 with Retry-After, so the forge retries. Pings answer 200; branch
deletions and other events answer 200 with the reason they were ignored. Nothing is published
for any answer but 202. HMACs and JSON parsing of large bodies run off the event loop, so
health checks and other deliveries are answered during a flood.

Per delivery the work is kept to what the checks need (bench/bench_eval.py prints its CPU
time beside a bare aiohttp server's): no timer for a body that has already arrived or for a
publish the bus bounds itself, one JSON parse, cached HMAC keys and metric children.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from niphas_common.bus.bus import Bus
from niphas_common.bus.publisher import PublishError
from niphas_common.http import Readiness, add_ops_routes
from niphas_eval.forges import ADAPTERS, ForgeAdapter
from niphas_eval.forges.base import Ignored, Ping, WebhookRejected
from niphas_eval.metrics import webhook_outcome
from niphas_eval.secrets import RepositorySecret, WebhookSecrets, normalise_key
from niphas_schemas import PushReceived

log = logging.getLogger(__name__)

RETRY_AFTER_S = "5"
OFF_LOOP_BYTES = 256 * 1024
"""Bodies larger than this are hashed and parsed in a thread, off the event loop."""


class WebhookIngress:
    def __init__(
        self,
        bus: Bus | Callable[[], Bus | None],
        secrets: WebhookSecrets,
        *,
        publish_timeout_s: float,
        read_timeout_s: float = 10.0,
    ) -> None:
        """`bus`: the bus, or how to get it while it may not be connected yet (503 until)."""
        self._bus_of: Callable[[], Bus | None] = (lambda: bus) if isinstance(bus, Bus) else bus
        self._secrets = secrets
        self._publish_timeout_s = publish_timeout_s
        self._read_timeout_s = read_timeout_s
        self._max_body_bytes = 1024 * 1024

    def app(self, readiness: Readiness, *, max_body_bytes: int) -> web.Application:
        # client_max_size makes request.read() stop at the cap (413) while reading.
        self._max_body_bytes = max_body_bytes
        app = web.Application(client_max_size=max_body_bytes)
        for family, adapter in ADAPTERS.items():
            app.router.add_post(f"/hooks/{family}", self._endpoint(adapter))
        add_ops_routes(app, readiness)
        return app

    def _endpoint(self, adapter: ForgeAdapter) -> Any:
        async def handle(request: web.Request) -> web.Response:
            forge = adapter.forge(request.headers)
            try:
                status, body = await self._handle(adapter, request)
            except WebhookRejected as exc:
                webhook_outcome(forge, "rejected").inc()
                log.warning("%s webhook refused (%d): %s", forge, exc.status, exc.reason)
                return web.json_response(
                    {"status": "rejected", "reason": exc.reason}, status=exc.status
                )
            webhook_outcome(forge, str(body["status"])).inc()
            headers = {"Retry-After": RETRY_AFTER_S} if status == 503 else None
            return web.json_response(body, status=status, headers=headers)

        return handle

    async def _handle(
        self, adapter: ForgeAdapter, request: web.Request
    ) -> tuple[int, dict[str, Any]]:
        headers = request.headers
        if (request.content_length or 0) > self._max_body_bytes:
            raise self._too_large()
        event = adapter.event(headers)
        delivery_id = adapter.delivery_id(headers)
        proof = adapter.proof(headers)
        candidates = self._secrets.candidates(adapter.family)
        if not adapter.signs_body:
            candidates = [c for c in candidates if adapter.proves(proof, b"", c.secret)]
            if not candidates:
                raise WebhookRejected(401, "the token matches no configured secret")
        raw = await self._read(request)
        verified = await self._verified(adapter, proof, raw, candidates)
        if len(raw) <= OFF_LOOP_BYTES:
            payload = adapter.payload(headers, raw)
        else:
            payload = await asyncio.to_thread(adapter.payload, headers, raw)
        keys = adapter.repository_keys(payload)
        entry = next((e for e in verified if e.names_any(keys)), None)
        if entry is None:
            named = keys[0] if keys else "no repository"
            raise WebhookRejected(
                403, f"the payload names {named}, not the repository whose secret signed it"
            )
        action = adapter.action(event, payload)
        if isinstance(action, Ping):
            return 200, {"status": "ping", "reason": "pong: the hook works, nothing published"}
        if isinstance(action, Ignored):
            return 200, {"status": "ignored", "reason": action.reason}
        repository = entry.repository(adapter.clone_url(payload))
        if repository is None:
            raise WebhookRejected(
                403, f"the push's clone URL is not {entry.key}'s (set clone_url in its entry)"
            )
        try:
            push = PushReceived(
                forge=entry.forge,
                repository=repository,
                ref=action.ref,
                before=action.before,
                commit=action.after,
                pusher=action.pusher[:255] if action.pusher else None,
                delivery_id=push_identity(repository, action.ref, action.before, action.after),
            )
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3]
            )
            raise WebhookRejected(400, f"unusable push: {problems}") from None
        return await self._publish(push, delivery_id)

    def _too_large(self) -> WebhookRejected:
        return WebhookRejected(413, f"body larger than {self._max_body_bytes} bytes")

    async def _read(self, request: web.Request) -> bytes:
        """The body, within the cap and READ_TIMEOUT_S (a stalled client is cut off)."""
        try:
            if request.content.is_eof():
                # All of it came with the headers (as forges send it): nothing to wait for.
                return await request.read()
            async with asyncio.timeout(self._read_timeout_s):  # no task, unlike wait_for
                return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise self._too_large() from None
        except TimeoutError:
            raise WebhookRejected(
                408, f"body not received within {self._read_timeout_s:g} s"
            ) from None

    async def _verified(
        self,
        adapter: ForgeAdapter,
        proof: str,
        raw: bytes,
        candidates: list[RepositorySecret],
    ) -> list[RepositorySecret]:
        """The entries whose secret the proof shows (one HMAC per distinct secret)."""
        if not adapter.signs_body:
            return candidates
        secrets = sorted({c.secret for c in candidates})

        def matching() -> set[str]:
            return {s for s in secrets if adapter.proves(proof, raw, s)}

        good = matching() if len(raw) <= OFF_LOOP_BYTES else await asyncio.to_thread(matching)
        verified = [c for c in candidates if c.secret in good]
        if not verified:
            raise WebhookRejected(401, "the signature matches no configured secret")
        return verified

    async def _publish(self, push: PushReceived, delivery: str) -> tuple[int, dict[str, Any]]:
        unavailable = {"status": "unavailable", "reason": "the event bus is not reachable"}
        bus = self._bus_of()
        if bus is None or not bus.connected:
            # Reconnecting: a publish would sit in the client's buffer until its timeout.
            return 503, unavailable
        try:
            if self._publish_timeout_s >= bus.settings.publish_timeout_s:
                # The bus gives up on the ack first (PublishError): no timer of ours.
                ack = await bus.publish(push)
            else:
                async with asyncio.timeout(self._publish_timeout_s):  # no task, unlike wait_for
                    ack = await bus.publish(push)
        except (PublishError, TimeoutError) as exc:
            log.warning("push.received %s not stored: %r", push.msg_id, exc)
            return 503, unavailable
        # DEBUG: the stored event is the record of an accepted push (`niphas events view`),
        # the forge keeps this answer, metrics count it; a line each cost ~15 us of CPU.
        log.debug(
            "push.received %s: %s %s@%s (%s delivery %s)%s",
            push.msg_id, push.repository, push.ref, push.commit, push.forge, delivery,
            ": a push already stored" if ack.duplicate else "",
        )  # fmt: skip
        return 202, {
            "delivery": delivery,
            "status": "duplicate" if ack.duplicate else "accepted",
            "event_id": push.event_id,
            "msg_id": push.msg_id,
            "duplicate": bool(ack.duplicate),
            "stream_seq": ack.seq,
        }


def push_identity(repository: str, ref: str, before: str | None, after: str) -> str:
    """The `delivery_id` of a forge's push: what it means, not the id its sender chose."""
    meaning = (normalise_key(repository), ref, before or "", after)
    return "push-" + hashlib.sha256("\x00".join(meaning).encode()).hexdigest()[:32]
