"""The webhook server: POST /hooks/{github,gitea,gitlab} -> `push.received`.

Per request: body (capped: 413) -> event and delivery headers (400) -> JSON (400) -> the
repository's secret (unknown repository or no secret: 403) -> the forge's signature or token
(401) -> what it asks for. A push is answered 202 only once JetStream acknowledged the
`push.received` (a redelivery with the same delivery id is stored once: still 202, with
`duplicate: true`); when the bus is down or slow the answer is 503 with Retry-After, so the
forge retries. Pings answer 200; branch deletions and other events answer 200 with the reason
they were ignored. Nothing is published for any answer but 202.
"""

from __future__ import annotations

import asyncio
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
from niphas_eval.metrics import WEBHOOKS
from niphas_eval.secrets import WebhookSecrets
from niphas_schemas import PushReceived

log = logging.getLogger(__name__)

RETRY_AFTER_S = "5"


class WebhookIngress:
    def __init__(
        self,
        bus: Bus | Callable[[], Bus | None],
        secrets: WebhookSecrets,
        *,
        publish_timeout_s: float,
    ) -> None:
        """`bus`: the bus, or how to get it while it may not be connected yet (503 until)."""
        self._bus_of: Callable[[], Bus | None] = (lambda: bus) if isinstance(bus, Bus) else bus
        self._secrets = secrets
        self._publish_timeout_s = publish_timeout_s
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
                WEBHOOKS.labels(forge, "rejected").inc()
                log.warning("%s webhook refused (%d): %s", forge, exc.status, exc.reason)
                return web.json_response(
                    {"status": "rejected", "reason": exc.reason}, status=exc.status
                )
            WEBHOOKS.labels(forge, str(body["status"])).inc()
            headers = {"Retry-After": RETRY_AFTER_S} if status == 503 else None
            return web.json_response(body, status=status, headers=headers)

        return handle

    async def _handle(
        self, adapter: ForgeAdapter, request: web.Request
    ) -> tuple[int, dict[str, Any]]:
        too_large = WebhookRejected(413, f"body larger than {self._max_body_bytes} bytes")
        if (request.content_length or 0) > self._max_body_bytes:
            raise too_large
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise too_large from None
        headers = request.headers
        forge = adapter.forge(headers)
        event = adapter.event(headers)
        delivery_id = adapter.delivery_id(headers)
        payload = adapter.payload(headers, raw)
        keys = adapter.repository_keys(payload)
        if not keys:
            raise WebhookRejected(403, "the payload names no repository")
        entry = self._secrets.lookup(keys, adapter.family)
        if entry is None:
            raise WebhookRejected(403, f"no webhook secret configured for {keys[0]}")
        adapter.authenticate(headers, raw, entry.secret)

        action = adapter.action(event, payload)
        if isinstance(action, Ping):
            return 200, {"status": "ping", "reason": "pong: the hook works, nothing published"}
        if isinstance(action, Ignored):
            return 200, {"status": "ignored", "reason": action.reason}
        repository = entry.clone_url or adapter.clone_url(payload)
        if repository is None:
            raise WebhookRejected(400, "the push names no clone URL")
        try:
            push = PushReceived(
                forge=forge,
                repository=repository,
                ref=action.ref,
                before=action.before,
                commit=action.after,
                pusher=action.pusher[:255] if action.pusher else None,
                delivery_id=delivery_id,
            )
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3]
            )
            raise WebhookRejected(400, f"unusable push: {problems}") from None
        return await self._publish(push)

    async def _publish(self, push: PushReceived) -> tuple[int, dict[str, Any]]:
        unavailable = {"status": "unavailable", "reason": "the event bus is not reachable"}
        bus = self._bus_of()
        if bus is None or not bus.connected:
            # Reconnecting: a publish would sit in the client's buffer until its timeout.
            return 503, unavailable
        try:
            ack = await asyncio.wait_for(bus.publish(push), self._publish_timeout_s)
        except (PublishError, TimeoutError) as exc:
            log.warning("push.received %s not stored: %r", push.msg_id, exc)
            return 503, unavailable
        log.info(
            "push.received %s: %s %s@%s%s",
            push.msg_id, push.repository, push.ref, push.commit,
            " (duplicate delivery)" if ack.duplicate else "",
        )  # fmt: skip
        return 202, {
            "status": "duplicate" if ack.duplicate else "accepted",
            "event_id": push.event_id,
            "msg_id": push.msg_id,
            "duplicate": bool(ack.duplicate),
            "stream_seq": ack.seq,
        }
