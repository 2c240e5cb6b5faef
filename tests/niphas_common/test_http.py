"""The ops endpoints every service serves: /healthz always, /readyz with the reason it is not
ready, /metrics in Prometheus text format (a real server on loopback)."""

from __future__ import annotations

import aiohttp

from niphas_common.http import serve_ops
from niphas_common.metrics import EVENTS_PUBLISHED


async def test_ops_endpoints() -> None:
    reason: str | None = "NATS not connected"

    async def readiness() -> str | None:
        return reason

    runner = await serve_ops("127.0.0.1", 0, readiness)
    try:
        port = runner.addresses[0][1]
        base = f"http://127.0.0.1:{port}"
        EVENTS_PUBLISHED.labels("push.received", "false").inc()
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/healthz") as resp:
                assert resp.status == 200
            async with http.get(f"{base}/readyz") as resp:
                assert resp.status == 503
                assert "NATS not connected" in await resp.text()
            reason = None
            async with http.get(f"{base}/readyz") as resp:
                assert resp.status == 200
            async with http.get(f"{base}/metrics") as resp:
                assert resp.status == 200
                text = await resp.text()
                assert (
                    'niphas_events_published_total{duplicate="false",subject="push.received"}'
                    in text
                )
    finally:
        await runner.cleanup()
