"""kubelet's plugin registration served by the driver: a kubelet-like client (`kubelet.py`, the
pluginwatcher's steps) registers it through `<kubelet root>/plugins_registry`; the socket only
appears once the CSI socket answers; a driver restart (clean or killed) puts a fresh socket in
place, a removed one is offered again, a kubelet restart re-dials the same one; what kubelet
reports is logged and is the driver's readiness."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import grpc
import pytest

from niphas_common.settings import NatsSettings
from niphas_csi.identity import IdentityService
from niphas_csi.proto import csi_pb2_grpc
from niphas_csi.proto import pluginregistration_pb2 as reg_pb2
from niphas_csi.proto import pluginregistration_pb2_grpc as reg_grpc
from niphas_csi.registrar import Registrar
from niphas_csi.registration import RegistrationService

from .conftest import NODE_ID, Driver, Node, driver_settings
from .kubelet import register

pytestmark = [pytest.mark.root]

REG_NAME = "csi.niphas.io-reg.sock"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def stale_socket(path: Path) -> None:
    """A socket file nobody listens on: what a killed process leaves behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))


def inode(path: Path) -> int:
    return os.stat(path).st_ino


async def eventually(check: Callable[[], bool], timeout_s: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {check}"
        await asyncio.sleep(0.05)


class Kubelet:
    """The kubelet side of the test: its root dir, and the driver's readiness as a probe."""

    def __init__(self, root: Path, port: int) -> None:
        self.registry = root / "plugins_registry"
        self.port = port

    @property
    def socket(self) -> Path:
        return self.registry / REG_NAME

    async def readyz(self) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.port}/readyz"
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            return response.status, await response.text()


@pytest.fixture
def kubelet() -> Iterator[Kubelet]:
    # A short root: the registration socket's path must fit a unix socket address.
    root = Path(tempfile.mkdtemp(prefix="kubelet-"))
    try:
        yield Kubelet(root, free_port())
    finally:
        shutil.rmtree(root)


@pytest.fixture
async def registered(
    bare_node: Node, kubelet: Kubelet, nats_settings: NatsSettings
) -> AsyncIterator[Driver]:
    settings = driver_settings(
        bare_node,
        registration_dir=kubelet.registry,
        registration_check_s=0.1,
        metrics_port=kubelet.port,
    )
    driver = Driver(settings, nats_settings)
    await driver.start()
    await eventually(kubelet.socket.exists)
    try:
        yield driver
    finally:
        await driver.stop()


async def test_kubelet_registers_the_driver(registered: Driver, kubelet: Kubelet) -> None:
    assert (await kubelet.readyz())[0] == 503
    assert "not registered" in (await kubelet.readyz())[1]
    result = await register(kubelet.socket)
    assert result.name == "csi.niphas.io"
    assert result.endpoint == str(registered.socket)
    assert result.node_id == NODE_ID

    async def ready() -> bool:
        return (await kubelet.readyz())[0] == 200

    deadline = asyncio.get_running_loop().time() + 10
    while not await ready():
        assert asyncio.get_running_loop().time() < deadline, await kubelet.readyz()
        await asyncio.sleep(0.1)
    # A restarted kubelet re-scans plugins_registry and dials the same file again.
    before = inode(kubelet.socket)
    assert (await register(kubelet.socket)).node_id == NODE_ID
    assert inode(kubelet.socket) == before


async def test_a_refused_registration_is_logged_and_not_ready(
    registered: Driver, kubelet: Kubelet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="niphas_csi")
    error = "RegisterPlugin error -- plugin registration failed with err: boom"
    with pytest.raises(RuntimeError, match="boom"):
        await register(kubelet.socket, refuse=error)
    assert any(r.levelno == logging.ERROR and error in r.getMessage() for r in caplog.records)
    status, text = await kubelet.readyz()
    assert status == 503
    assert error in text
    # kubelet tries again (it restarted): the driver is ready once it is registered.
    await register(kubelet.socket)
    assert error not in (await kubelet.readyz())[1]


async def test_kubelet_is_told_the_socket_path_it_sees(
    bare_node: Node, kubelet: Kubelet, nats_settings: NatsSettings
) -> None:
    host_path = Path("/var/lib/kubelet/plugins/csi.niphas.io/csi.sock")
    settings = driver_settings(
        bare_node, registration_dir=kubelet.registry, kubelet_socket=host_path
    )
    driver = Driver(settings, nats_settings)
    await driver.start()
    try:
        await eventually(kubelet.socket.exists)
        async with grpc.aio.insecure_channel(f"unix://{kubelet.socket}") as channel:
            client = reg_grpc.RegistrationStub(channel)  # type: ignore[no-untyped-call]
            info = await client.GetInfo(reg_pb2.InfoRequest(), timeout=1)
        assert (info.type, info.endpoint) == ("CSIPlugin", str(host_path))
        assert list(info.supported_versions) == ["1.0.0"]
    finally:
        await driver.stop()


async def test_registration_appears_only_once_the_csi_socket_answers(tmp_path: Path) -> None:
    csi_socket = tmp_path / "plugins" / "csi.sock"
    stale_socket(csi_socket)  # the file exists, but nothing answers on it yet
    registry = tmp_path / "plugins_registry"
    registrar = Registrar(registry, RegistrationService(csi_socket), check_s=10)
    server = grpc.aio.server()
    csi_pb2_grpc.add_IdentityServicer_to_server(IdentityService("0", lambda: True), server)  # type: ignore[no-untyped-call]
    starting = asyncio.create_task(registrar.start(csi_socket))
    try:
        await asyncio.sleep(0.5)
        # kubelet ignores dot-files; anything else in the dir would be dialed (once) now.
        assert not [p for p in registry.glob("*") if not p.name.startswith(".")]
        assert not starting.done()

        os.unlink(csi_socket)
        server.add_insecure_port(f"unix://{csi_socket}")
        await server.start()
        await asyncio.wait_for(starting, 10)
        assert (registry / REG_NAME).is_socket()
        assert not list(registry.glob(".*"))  # the dot-name was renamed into place
        await registrar.close()
        assert not (registry / REG_NAME).exists()
    finally:
        starting.cancel()
        await registrar.close()
        await server.stop(None)


async def test_a_driver_restart_puts_a_fresh_socket_in_place(
    registered: Driver, kubelet: Kubelet
) -> None:
    await register(kubelet.socket)
    await registered.stop()
    assert not kubelet.socket.exists()  # kubelet deregisters the driver it cannot reach
    await registered.start()
    await eventually(kubelet.socket.exists)
    assert (await register(kubelet.socket)).node_id == NODE_ID

    # Killed rather than stopped: the old file stays; the next start replaces it.
    await registered.stop()
    stale_socket(kubelet.socket)
    stale = inode(kubelet.socket)
    await registered.start()
    await eventually(lambda: kubelet.socket.exists() and inode(kubelet.socket) != stale)
    assert (await register(kubelet.socket)).node_id == NODE_ID


async def test_a_removed_socket_is_offered_again(registered: Driver, kubelet: Kubelet) -> None:
    await register(kubelet.socket)
    os.unlink(kubelet.socket)
    await eventually(kubelet.socket.exists)
    assert "not registered" in (await kubelet.readyz())[1]  # a new offer, not yet taken
    assert (await register(kubelet.socket)).node_id == NODE_ID
