"""The `niphas` command fails fast and in one line, run as the installed console script: with
the server down, silent or not speaking NATS, every `events` command exits 1 within the
connect timeout with one line naming the URL and the cause (no traceback, no retry loop); a
stream is named by its name or any of its subjects, an unknown one is refused with the list
of streams; unknown settings sections and kubeconfig files get one line and a non-zero exit."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from niphas_common.bus.bus import Bus
from niphas_common.bus.topology import ConsumerSpec, ensure_consumer
from tests.niphas_common.test_events_cli import NIPHAS

CONNECT_TIMEOUT_S = 2
EVENTS_COMMANDS = (
    ("events", "streams"),
    ("events", "consumers", "PUSH_RECEIVED"),
    ("events", "view", "push.received"),
    ("events", "tail", "push.received"),
)


def niphas(*args: str, nats_url: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NIPHAS_NATS_CONNECT_TIMEOUT_S": str(CONNECT_TIMEOUT_S)}
    env.pop("KUBECONFIG", None)
    if nats_url is not None:
        env["NATS_URL"] = nats_url
    # Generous: the command's own deadline is the connect timeout; the rest is start-up.
    return subprocess.run([NIPHAS, *args], env=env, capture_output=True, text=True, timeout=60)


def one_line_failure(result: subprocess.CompletedProcess[str], *parts: str) -> str:
    assert result.returncode != 0, result
    assert result.stdout == "", result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts connections and never says anything."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        yield server.getsockname()[1]


@pytest.fixture
def http_port() -> Iterator[int]:
    """A loopback port answering every connection with an HTTP error, as a web server would."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_every_events_command_fails_in_one_line_when_the_server_is_down_or_wrong(
    silent_port: int, http_port: int
) -> None:
    servers = {
        f"nats://127.0.0.1:{free_port()}": "Connection refused",
        f"nats://127.0.0.1:{silent_port}": f"no NATS answer within {CONNECT_TIMEOUT_S} s",
        f"nats://127.0.0.1:{http_port}": "",
    }
    for url, cause in servers.items():
        for command in EVENTS_COMMANDS:
            result = await asyncio.to_thread(niphas, *command, nats_url=url)
            line = one_line_failure(result, "niphas events: ", url, cause)
            assert result.returncode == 1
            assert "Traceback" not in line


async def test_a_subject_names_its_stream_and_unknown_names_list_the_streams(
    bus: Bus, nats_url: str
) -> None:
    await ensure_consumer(bus.js, ConsumerSpec(durable="builders", subject="eval.done"))
    by_subject = await asyncio.to_thread(niphas, "events", "consumers", "eval.done",
                                         nats_url=nats_url)  # fmt: skip
    assert by_subject.returncode == 0, by_subject.stderr
    assert "builders" in by_subject.stdout
    by_name = await asyncio.to_thread(niphas, "events", "consumers", "EVAL_DONE",
                                      nats_url=nats_url)  # fmt: skip
    assert by_name.returncode == 0 and "builders" in by_name.stdout

    unknown = await asyncio.to_thread(niphas, "events", "consumers", "nope.x", nats_url=nats_url)
    line = one_line_failure(unknown, "nope.x", "streams: ", "EVAL_DONE", "PUSH_RECEIVED")
    assert unknown.returncode == 1, line
    unknown_view = await asyncio.to_thread(niphas, "events", "view", "nope.x", nats_url=nats_url)
    one_line_failure(unknown_view, "no stream holds subject", "nope.x", "streams: ", "EVAL_DONE")

    stream_view = await asyncio.to_thread(niphas, "events", "view", "EVAL_DONE",
                                          nats_url=nats_url)  # fmt: skip
    assert stream_view.returncode == 0, stream_view.stderr
    assert "no events on EVAL_DONE" in stream_view.stdout


def test_unknown_settings_section_and_kubeconfig_file_get_one_line(tmp_path: Path) -> None:
    settings = niphas("settings", "nosuch")
    one_line_failure(settings, "no service 'nosuch'", "services: ", "eval")
    assert niphas("settings", "eval").returncode == 0

    missing = tmp_path / "no-such-kubeconfig"
    rollback = niphas("rollback", "app", "--kubeconfig", str(missing))
    one_line_failure(rollback, str(missing), "no such file")
    broken = tmp_path / "broken-kubeconfig"
    broken.write_text("apiVersion: v1\nkind: Config\nclusters: 7\n")
    rollback = niphas("rollback", "app", "--kubeconfig", str(broken))
    one_line_failure(rollback, str(broken))
