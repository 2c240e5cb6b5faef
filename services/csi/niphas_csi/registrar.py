"""The registration socket's lifecycle in kubelet's `plugins_registry` dir.

kubelet acts on the socket file, not on us, so when the file exists is the whole protocol:
- it appears only once the CSI socket answers: kubelet tries a new socket once, and a failed
  NodeGetInfo is never retried until the file is created again;
- it appears atomically, already serving: grpc binds (creates the file) before it serves, so
  we bind a dot-name kubelet ignores and rename it into place (kubelet sees the rename as a
  create);
- a file left by a killed driver is replaced at start (kubelet re-registers on the create);
- it is removed at shutdown (kubelet deregisters the driver) but only if it is still ours;
- it is checked every few seconds and offered again if someone removed it (a file another
  driver put there, e.g. a surging DaemonSet pod, is left to that driver).
A kubelet restart needs nothing from us: kubelet re-scans the dir and dials the file again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

import grpc

from .proto import csi_pb2, csi_pb2_grpc
from .proto import pluginregistration_pb2_grpc as reg_grpc
from .registration import RegistrationService
from .settings import DRIVER_NAME

log = logging.getLogger(__name__)

DRIVER_WAIT_S = 30.0
"""How long to wait for our own CSI socket to answer before giving up on starting."""


def registration_socket(directory: Path) -> Path:
    """`<plugins_registry>/<driver>-reg.sock`: node-driver-registrar's name, so a node that
    ran the sidecar before has its old file replaced rather than registered twice."""
    return directory / f"{DRIVER_NAME}-reg.sock"


async def wait_until_serving(csi_socket: Path, timeout_s: float = DRIVER_WAIT_S) -> None:
    """Return once the CSI socket answers GetPluginInfo as kubelet would call it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        async with grpc.aio.insecure_channel(f"unix://{csi_socket}") as channel:
            identity = csi_pb2_grpc.IdentityStub(channel)  # type: ignore[no-untyped-call]
            try:
                await identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=1)
                return
            except grpc.aio.AioRpcError as exc:
                if loop.time() > deadline:
                    raise RuntimeError(f"the CSI socket {csi_socket} does not answer") from exc
        await asyncio.sleep(0.05)


SUN_PATH_MAX = 107
"""Longest unix socket path the kernel takes (sun_path is 108 bytes with the NUL)."""


class Registrar:
    def __init__(self, directory: Path, service: RegistrationService, check_s: float) -> None:
        self.path = registration_socket(directory)
        if len(os.fsencode(self.path)) > SUN_PATH_MAX:
            # grpc only logs a bind failure; say it here, where the setting is at fault.
            raise ValueError(f"registration socket path {self.path} is over {SUN_PATH_MAX} bytes")
        self.service = service
        self.check_s = check_s
        self._server: grpc.aio.Server | None = None
        self._ours: tuple[int, int] | None = None  # (st_dev, st_ino) of the file we placed
        self._watch: asyncio.Task[None] | None = None

    async def start(self, csi_socket: Path) -> None:
        """Offer the registration once `csi_socket` answers, and keep it offered."""
        await wait_until_serving(csi_socket)
        await self._offer()
        self._watch = asyncio.create_task(self._keep_offered())

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        # The file first: kubelet must stop dialing us before the server goes.
        if self._is_ours():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        await self._stop_server()

    def _is_ours(self) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self._ours

    async def _offer(self) -> None:
        await self._stop_server()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        hidden = self.path.with_name(f".reg-{os.getpid()}.sock")  # no longer than the real name
        with contextlib.suppress(FileNotFoundError):
            os.unlink(hidden)
        server = grpc.aio.server(maximum_concurrent_rpcs=4)
        reg_grpc.add_RegistrationServicer_to_server(self.service, server)  # type: ignore[no-untyped-call]
        if not server.add_insecure_port(f"unix://{hidden}"):
            raise OSError(f"cannot listen on {hidden}")
        await server.start()
        self._server = server
        if self.path.exists():
            # A killed driver's file. The rename replaces it atomically; kubelet sees a create
            # with a new timestamp, deregisters the old registration and registers ours.
            log.info("replacing the stale registration socket %s", self.path)
        self.service.reset()
        os.rename(hidden, self.path)
        st = os.stat(self.path)
        self._ours = (st.st_dev, st.st_ino)
        log.info("offering kubelet the registration at %s", self.path)

    async def _keep_offered(self) -> None:
        while True:
            await asyncio.sleep(self.check_s)
            if self._is_ours():
                continue
            if self.path.exists():
                log.warning("another driver replaced %s; leaving the registration to it", self.path)
                return
            log.warning("the registration socket %s was removed; offering it again", self.path)
            await self._offer()

    async def _stop_server(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=1)
            self._server = None
