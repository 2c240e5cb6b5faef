"""Build logs over HTTP and with `niphas logs`, read from the real log stream on a real
nats-server: a whole log, a log followed while it is written, every build of a push; unknown
or malformed ids are one 404 (the same answer whatever the reason), a token-protected server
refuses callers without it (403), and the CLI fails in one line."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from niphas_common.bus.build_logs import BuildLogs, build_logs
from niphas_common.bus.bus import Bus
from niphas_reporter.app import http_app
from niphas_reporter.settings import ReporterSettings
from niphas_schemas import EvalDone, EvaluatedAttribute

DRV = "/nix/store/" + "a" * 32 + "-app.drv"
OTHER = "/nix/store/" + "b" * 32 + "-lib.drv"
NIPHAS = str(Path(sys.executable).with_name("niphas"))


@pytest.fixture
async def logs(bus: Bus) -> BuildLogs:
    return await build_logs(bus, max_bytes=64 * 1024**2, max_age_s=3600)


async def serve(bus: Bus, settings: ReporterSettings) -> AsyncIterator[str]:
    runner = web.AppRunner(http_app(bus, settings), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def server(bus: Bus, tmp_path: Path) -> AsyncIterator[str]:
    async for url in serve(bus, ReporterSettings(state_dir=tmp_path)):
        yield url


async def get(url: str, **kw: object) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url, **kw) as response:  # type: ignore[arg-type]
        return response.status, await response.text()


async def test_a_whole_log_and_unknown_ids(logs: BuildLogs, server: str) -> None:
    await logs.start(DRV)
    await logs.append(DRV, b"building app\n" * 3)
    await logs.append(DRV, "error: builder failed \u2717\n".encode())
    await logs.finish(DRV, "failed")
    code, text = await get(f"{server}/logs/drv/{'a' * 32}")
    assert code == 200
    assert text == "building app\n" * 3 + "error: builder failed \u2717\n\n[failed]\n"
    # A rebuild replaces the log rather than appending to it.
    await logs.start(DRV)
    await logs.append(DRV, b"second run\n")
    code, text = await get(f"{server}/logs/drv/{'a' * 32}")
    assert (code, text) == (200, "second run\n\n[still building]\n")
    for bad in ("b" * 32, "e" * 32, "..%2F..%2Fetc%2Fpasswd", "a" * 31, "%3Cscript%3E"):
        assert await get(f"{server}/logs/drv/{bad}") == (404, "no such log\n"), bad


async def test_a_log_followed_while_it_is_written(logs: BuildLogs, server: str) -> None:
    await logs.start(DRV)
    await logs.append(DRV, b"line 1\n")
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{server}/logs/drv/{'a' * 32}?follow=1") as response,
    ):
        assert response.status == 200
        assert await response.content.readline() == b"line 1\n"
        await logs.append(DRV, b"line 2\n")  # written after the reader started
        assert await response.content.readline() == b"line 2\n"
        await logs.finish(DRV, "built")
        assert await response.text() == "\n[built]\n"


async def test_every_build_of_a_push(bus: Bus, logs: BuildLogs, server: str) -> None:
    attrs = tuple(
        EvaluatedAttribute(attribute=name, attr_path=f"packages.x86_64-linux.{name}",
                           system="x86_64-linux", drv_path=drv, outputs={"out": drv[:-4]})
        for name, drv in (("app", DRV), ("lib", OTHER))
    )  # fmt: skip
    await bus.publish(EvalDone(push_event_id="push-77", repository="https://forge.test/a/b.git",
                               commit="7" * 40, status="succeeded", attributes=attrs))  # fmt: skip
    await logs.start(DRV)
    await logs.append(DRV, b"app log\n")
    await logs.finish(DRV, "built")
    for ident in ("push-77", "7" * 40):
        code, text = await get(f"{server}/logs/push/{ident}")
        assert code == 200
        assert f"==> app ({'a' * 32}) <==\napp log\n\n[built]\n" in text
        assert f"==> lib ({'b' * 32}) <==\n(no log kept" in text
    assert await get(f"{server}/logs/push/push-78") == (404, "no such log\n")


async def test_a_token_protected_server_refuses_callers_without_it(
    bus: Bus, logs: BuildLogs, tmp_path: Path
) -> None:
    (tmp_path / "token").write_text("s3cret\n")
    settings = ReporterSettings(state_dir=tmp_path, logs_token_file=tmp_path / "token")
    await logs.start(DRV)
    await logs.finish(DRV, "built")
    async for url in serve(bus, settings):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            assert await get(f"{url}/logs/drv/{'a' * 32}", headers=headers) == (403, "forbidden\n")
            assert await get(f"{url}/logs/drv/{'e' * 32}", headers=headers) == (403, "forbidden\n")
        ok = await get(f"{url}/logs/drv/{'a' * 32}", headers={"Authorization": "Bearer s3cret"})
        assert ok == (200, "\n[built]\n")


async def test_niphas_logs_prints_a_log_and_fails_in_one_line(
    logs: BuildLogs, nats_url: str
) -> None:
    await logs.start(DRV)
    await logs.append(DRV, b"hello from the build\n")
    await logs.finish(DRV, "built")

    def niphas(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([NIPHAS, "logs", *args, "--nats-url", nats_url],
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    done = await asyncio.to_thread(niphas, "drv", DRV, "--follow")
    assert done.returncode == 0 and done.stdout == "hello from the build\n\n[built]\n"
    missing = await asyncio.to_thread(niphas, "drv", "e" * 32)
    assert missing.returncode == 1
    assert missing.stderr == f"niphas logs: no log of {'e' * 32}\n"
    wrong = await asyncio.to_thread(niphas, "workload-x", "web")
    assert wrong.returncode == 2 and "expected drv, push or workload" in wrong.stderr
