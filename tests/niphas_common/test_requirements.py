"""What a service requires (a Secret's file, the NATS password) is reported, not crashed on:
/readyz answers 503 naming it, the log has one ERROR (repeated only at a low rate, never a
traceback), and the service becomes ready when the file appears, without a restart. A service
whose NATS password is empty says so instead of nats-py's traceback per reconnect attempt."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from niphas_common.nats_server import EmbeddedNats
from niphas_common.requirements import Requirements
from niphas_common.service import ServiceRuntime, Stopped
from niphas_common.settings import NatsSettings, ServiceSettings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_missing_file_is_reported_once_then_ready_when_it_appears(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    key = tmp_path / "cache-key" / "secret-key"
    runtime = ServiceRuntime("builder", NatsSettings(), instance="t")
    runtime.requires_file(key, "the Secret niphas-cache-key (key secret-key)")
    port = free_port()
    await runtime.serve_ops(ServiceSettings(metrics_port=port, metrics_host="127.0.0.1"))
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(3):  # probes do not repeat the log line
                async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                    assert resp.status == 503
                    body = await resp.text()
            assert f"{key} is missing: create the Secret niphas-cache-key" in body
            assert errors(caplog) == [
                f"builder: not ready: {body.removeprefix('not ready: ')}"[:-1]
            ]
            assert not any(r.exc_info for r in caplog.records)

            key.parent.mkdir()
            key.write_text("cluster-1:c2VjcmV0\n")  # the Secret appears in the volume
            async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                # Requirements met; what remains is the bus this test never connected.
                assert (await resp.text()).strip() == "not ready: NATS not connected"
            assert any("is there now" in r.getMessage() for r in caplog.records)
            assert len(errors(caplog)) == 1
    finally:
        await runtime.close()


async def test_the_error_repeats_at_a_low_rate_and_wait_returns_when_met(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    now = [0.0]
    token = tmp_path / "token"
    reqs = Requirements("mesh", relog_s=60.0, clock=lambda: now[0])
    reqs.file(token, "the Secret niphas-cache-upload (key token)")
    for t in (1.0, 10.0, 59.0):
        now[0] = t
        assert reqs.check() is not None
    assert len(errors(caplog)) == 1
    now[0] = 61.0
    reqs.check()
    assert len(errors(caplog)) == 2
    token.write_text("")
    assert "is empty" in (reqs.check() or "")  # a new reason is logged at once
    assert len(errors(caplog)) == 3

    stop = asyncio.Event()
    waiting = asyncio.create_task(reqs.wait(stop, poll_s=0.05))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    token.write_text("t0ken")
    assert await asyncio.wait_for(waiting, 2) is True
    stop.set()
    assert await reqs.wait(stop) is True  # met: no wait, whatever stop says


async def test_requirements_met_raises_stopped_when_stopped_first(tmp_path: Path) -> None:
    runtime = ServiceRuntime("eval", NatsSettings())
    runtime.requires_file(tmp_path / "secrets.yaml", "the Secret niphas-eval-webhooks")
    stop = asyncio.Event()
    stop.set()
    with pytest.raises(Stopped):
        await runtime.requirements_met(stop)


def test_an_empty_nats_password_is_a_requirement() -> None:
    runtime = ServiceRuntime("operator", NatsSettings(url="nats://x:4222", user="niphas"))
    reason = runtime.requirements.check()
    assert reason is not None
    assert reason.startswith("NIPHAS_NATS_PASSWORD is empty: create the Secret niphas-nats")
    assert (
        ServiceRuntime("csi", NatsSettings(user="niphas", password="p")).requirements.check()
        is None
    )
    assert ServiceRuntime("csi", NatsSettings()).requirements.check() is None  # no auth at all


EMPTY_PASSWORD = """
import asyncio, logging, sys
from niphas_common.service import ServiceRuntime, Stopped
from niphas_common.settings import NatsSettings
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

async def main():
    runtime = ServiceRuntime("operator", NatsSettings(url=sys.argv[1], user="niphas"))
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(float(sys.argv[2]), stop.set)
    try:
        await runtime.connect_retrying(stop)
    except Stopped:
        print("READYZ", await runtime.readiness())

asyncio.run(main())
"""


@pytest.mark.slow
async def test_an_empty_nats_password_is_explained_without_tracebacks(tmp_path: Path) -> None:
    """In a child process: nats-py leaks the socket of a refused connection."""
    with EmbeddedNats(tmp_path / "auth", extra_args=("--user", "niphas", "--pass", "s3cret")) as s:
        # A blocking run in a thread: asyncio's pipe transports would outlive this test's
        # loop and warn while a later test runs.
        child = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c", EMPTY_PASSWORD, s.url, "4.5"],
            capture_output=True, timeout=30, check=False,
        )  # fmt: skip
    out, err = child.stdout, child.stderr
    log = err.decode()
    assert child.returncode == 0, log
    assert "Traceback" not in log
    assert log.count("ERROR operator: not ready: NIPHAS_NATS_PASSWORD is empty") == 1, log
    # Three attempts in 4.5 s, one line about the refusal.
    assert log.count("Authorization Violation") <= 2, log
    assert "READYZ NIPHAS_NATS_PASSWORD is empty: create the Secret niphas-nats" in out.decode()
