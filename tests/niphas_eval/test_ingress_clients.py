"""Hostile and broken clients against the real webhook ingress on loopback (real nats-server):
nothing unauthenticated is parsed; garbage of any shape, signed or not, gets a 4xx, never a
5xx; a client that stalls or trickles its body is cut off by the read timeout; health checks
and real deliveries are answered during a flood of large unauthenticated bodies; and strings
a client controls never forge a line of the text or JSON log."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlencode

import aiohttp
import pytest
from aiohttp import web

from niphas_common.bus.bus import Bus
from niphas_common.logs import JsonFormatter, TextFormatter
from niphas_common.service import ServiceRuntime
from niphas_eval.ingress import WebhookIngress
from niphas_eval.secrets import WebhookSecrets
from tests.niphas_eval.conftest import (
    INGRESS_READ_TIMEOUT_S,
    SECRETS,
    Delivery,
    Ingress,
    github_push,
    gitlab_push,
)
from tests.niphas_eval.test_ingress import resigned, stored

B = "b" * 40
CLONE = "https://github.example/acme/app.git"
GOOD = github_push("github-secret", clone_url=CLONE, after=B)


def unsigned(body: bytes, content_type: str = "application/json") -> Delivery:
    """`body` at the GitHub endpoint with a well-formed but wrong signature."""
    headers = {**GOOD.headers, "Content-Type": content_type}
    headers["X-Hub-Signature-256"] = "sha256=" + "0" * 64
    return Delivery(GOOD.path, headers, body)


def shapes() -> dict[str, bytes]:
    """Bodies that are not a usable push, each a different way."""
    payload = json.loads(GOOD.body)

    def variant(**changes: object) -> bytes:
        return json.dumps({**payload, **changes}).encode()

    repo = payload["repository"]
    return {
        "empty": b"",
        "deeply nested arrays": b"[" * 30_000 + b"]" * 30_000,
        "deeply nested objects": b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
        "an integer too long to convert": b'{"ref": ' + b"1" * 10_000 + b"}",
        "invalid utf-8": b'{"ref": "\xff\xfe"}',
        "NUL bytes": b"\x00" * 1000,
        "a JSON string": b'"push"',
        "null": b"null",
        "repository as a list": variant(repository=[repo]),
        "repository fields of other types": variant(
            repository={**repo, "full_name": 7, "clone_url": ["x"], "ssh_url": None}
        ),
        "ref as a number": variant(ref=12),
        "after not a sha": variant(after="not-a-sha"),
        "ref with control characters": variant(ref="refs/heads/\x00\n\x1b"),
        "clone URL with a bad port": variant(repository={**repo, "clone_url": "https://h:99999999/acme/app"}),
        "clone URL that is not a URL": variant(repository={**repo, "clone_url": "[::"}),
        "NaN and Infinity": b'{"ref": NaN, "after": Infinity}',
    }  # fmt: skip


async def test_garbage_of_any_shape_gets_a_4xx_never_a_5xx(ingress: Ingress, bus: Bus) -> None:
    for name, body in shapes().items():
        # Unsigned: refused before the body is looked at, whatever it holds.
        status, answer = await ingress.send(unsigned(body))
        assert status == 401, f"unsigned {name}: {status} {answer}"
        # Signed: parsed, and refused with a 4xx naming the problem.
        status, answer = await ingress.send(resigned(GOOD, body))
        assert 400 <= status < 500, f"signed {name}: {status} {answer}"
        assert answer["status"] == "rejected", name
        form = urlencode({"payload": body.decode(errors="replace")}).encode()
        signed_form = resigned(unsigned(form, "application/x-www-form-urlencoded"), form)
        status, answer = await ingress.send(signed_form)
        assert 400 <= status < 500, f"signed form {name}: {status} {answer}"

    # Broken requests: wrong method, headers of the wrong shape, a lying Content-Length.
    async with ingress.http.get(ingress.url + "/hooks/github") as resp:
        assert resp.status == 405
    long_id = {**GOOD.headers, "X-GitHub-Delivery": "x" * 300}
    status, _ = await ingress.send(Delivery(GOOD.path, long_id, GOOD.body))
    assert status == 400
    gitlab_form = gitlab_push("gitlab-token", clone_url="https://gitlab.example/acme/api.git",
                              after=B)  # fmt: skip
    headers = {**gitlab_form.headers, "Content-Type": "application/x-www-form-urlencoded"}
    status, _ = await ingress.send(Delivery(gitlab_form.path, headers, b"payload=%%%&&"))
    assert status == 400
    reader, writer = await asyncio.open_connection("127.0.0.1", ingress.port)
    writer.write(b"POST /hooks/github HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n")
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    assert status_line.split()[1].startswith(b"4"), status_line
    assert await stored(bus) == 0


async def http_status(port: int, request: bytes, pieces: list[bytes], gap_s: float) -> bytes:
    """Send `request` then `pieces` one every `gap_s` seconds (until the server stops
    reading); the status line answered, or b"" when the server closed the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()

        async def trickle() -> None:
            for piece in pieces:
                await asyncio.sleep(gap_s)
                writer.write(piece)
                await writer.drain()

        sender = asyncio.create_task(trickle())
        try:
            return await asyncio.wait_for(reader.readline(), INGRESS_READ_TIMEOUT_S * 10)
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
    except ConnectionError:
        return b""
    finally:
        writer.close()


async def test_stalled_and_trickling_clients_are_cut_off(ingress: Ingress, bus: Bus) -> None:
    head = (
        b"POST /hooks/github HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + b"".join(f"{k}: {v}\r\n".encode() for k, v in GOOD.headers.items())
        + f"Content-Length: {len(GOOD.body)}\r\n\r\n".encode()
    )
    # Stalled: a tenth of the body, then nothing.
    stalled = await http_status(ingress.port, head + GOOD.body[:50], [], 0)
    assert stalled.startswith(b"HTTP/1.1 408"), stalled
    # Trickling: one byte per 0.2 s would take minutes; it is cut off all the same.
    trickled = await http_status(ingress.port, head, [bytes([c]) for c in GOOD.body], 0.2)
    assert trickled.startswith(b"HTTP/1.1 408"), trickled
    # An idle connection that never sends a request is closed, not kept.
    reader, writer = await asyncio.open_connection("127.0.0.1", ingress.port)
    assert await asyncio.wait_for(reader.read(), INGRESS_READ_TIMEOUT_S * 10) == b""
    writer.close()
    assert await stored(bus) == 0


@pytest.fixture
async def big_ingress(bus: Bus) -> AsyncIterator[Ingress]:
    """The ingress with the production cap (25 MB bodies)."""
    runtime = ServiceRuntime("eval", bus.settings, bus=bus)
    hooks = WebhookIngress(bus, WebhookSecrets.from_mapping(SECRETS), publish_timeout_s=5.0)
    runner = web.AppRunner(hooks.app(runtime.readiness, max_body_bytes=25 * 1024 * 1024))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    async with aiohttp.ClientSession() as http:
        yield Ingress(f"http://127.0.0.1:{port}", http, port)
    await runner.cleanup()


async def test_health_and_deliveries_are_answered_during_a_flood(
    big_ingress: Ingress, bus: Bus
) -> None:
    # 8 MB form-encoded bodies (parsing one took seconds of the event loop when bodies were
    # parsed before they were authenticated), 6 at a time, 24 in all.
    flood_body = urlencode({"payload": "[" * 4_000_000, "x": "y&" * 1_000_000}).encode()
    flood = unsigned(flood_body, "application/x-www-form-urlencoded")
    statuses: list[int] = []
    health: list[float] = []

    async def flooder() -> None:
        for _ in range(4):
            async with big_ingress.http.post(
                big_ingress.url + flood.path, data=io.BytesIO(flood.body), headers=flood.headers
            ) as resp:
                statuses.append(resp.status)

    async def prober(stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            async with big_ingress.http.get(
                big_ingress.url + "/healthz", timeout=aiohttp.ClientTimeout(total=5)
            ) as resp:
                assert resp.status == 200
            health.append(time.monotonic() - started)
            await asyncio.sleep(0.05)

    stop = asyncio.Event()
    probe = asyncio.create_task(prober(stop))
    floods = [asyncio.create_task(flooder()) for _ in range(6)]
    await asyncio.sleep(0.5)
    status, answer = await big_ingress.send(github_push("github-secret", clone_url=CLONE, after=B))
    await asyncio.gather(*floods)
    stop.set()
    await probe

    assert status == 202, answer  # a real delivery in the middle of the flood
    assert statuses == [401] * 24
    assert len(health) >= 3
    print(f"flood: {len(health)} health checks, slowest {max(health) * 1000:.0f} ms")
    assert await stored(bus) == 1


@pytest.fixture
def log_lines() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    """The ingress's log as text and as JSON, through the service's own formatters."""
    text, js = io.StringIO(), io.StringIO()
    handlers = [logging.StreamHandler(text), logging.StreamHandler(js)]
    handlers[0].setFormatter(TextFormatter())
    handlers[1].setFormatter(JsonFormatter())
    logger = logging.getLogger("niphas_eval")
    for handler in handlers:
        logger.addHandler(handler)
    try:
        yield text, js
    finally:
        for handler in handlers:
            logger.removeHandler(handler)


async def test_client_strings_never_forge_a_log_line(
    ingress: Ingress, bus: Bus, log_lines: tuple[io.StringIO, io.StringIO]
) -> None:
    forged = "\n2026-01-01 00:00:00,000 INFO    niphas_eval.ingress: FORGED\r\u2028\x85"
    payload = json.loads(GOOD.body)
    repo = payload["repository"]
    bodies = [
        {**payload, "repository": {**repo, "full_name": "evil/x" + forged,
                                   "clone_url": "https://h/x" + forged}},
        {**payload, "ref": "refs/heads/main" + forged},
        {**payload, "pusher": {"name": "octocat" + forged}},
        {**payload, "repository": {**repo, "clone_url": "file:///x" + forged}},
    ]  # fmt: skip
    for body in bodies:
        raw = json.dumps(body, ensure_ascii=False).encode()
        await ingress.send(resigned(GOOD, raw))
        await ingress.send(unsigned(raw))
    await ingress.send(unsigned(forged.encode()))

    text, js = log_lines[0].getvalue(), log_lines[1].getvalue()
    records = js.count("\n")
    assert records >= 8  # one line per refusal
    assert text.count("\n") == records
    assert "FORGED" in text  # the client's string is logged, escaped, inside its line
    assert not any(line.startswith("2026-01-01") for line in text.split("\n"))
    messages = [json.loads(line)["message"] for line in js.splitlines()]
    assert any(forged in message for message in messages)  # JSON keeps it exact, escaped
