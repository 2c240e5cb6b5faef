"""kubelet's plugin registration API (pluginregistration v1), served by the driver itself.

kubelet's plugin watcher finds our socket in its `plugins_registry` dir, asks `GetInfo` who we
are and where our CSI socket is, calls the driver's `NodeGetInfo` there, and reports the
outcome with `NotifyRegistrationStatus`. Serving this ourselves replaces the
node-driver-registrar sidecar (an image that cannot be built offline). The socket's lifecycle
(when it appears, when it goes) is `registrar.py`'s; this module only answers and remembers
what kubelet said, for the logs and for readiness.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .proto import pluginregistration_pb2 as reg_pb2
from .proto import pluginregistration_pb2_grpc as reg_grpc
from .server_types import Context
from .settings import DRIVER_NAME

log = logging.getLogger(__name__)

PLUGIN_TYPE = "CSIPlugin"
"""kubelet's handler key for CSI drivers (DevicePlugin is the other)."""
SUPPORTED_VERSIONS = ("1.0.0",)
"""CSI spec versions we speak; kubelet 1.17+ accepts only 1.x and picks the highest."""


@dataclass
class KubeletVerdict:
    """What kubelet last told us. `registered` is None until it has said anything since the
    socket was (re)offered: kubelet has not found it yet, or is not running."""

    registered: bool | None = None
    error: str = ""


class RegistrationService(reg_grpc.RegistrationServicer):
    def __init__(self, kubelet_socket: Path) -> None:
        # kubelet dials this path itself, so it must be the CSI socket as seen on the host,
        # which differs from our endpoint when we run in a container with the dir remounted.
        self.kubelet_socket = kubelet_socket
        self.verdict = KubeletVerdict()

    def reset(self) -> None:
        """The socket was (re)offered: whatever kubelet said before no longer holds."""
        self.verdict = KubeletVerdict()

    def not_ready(self) -> str | None:
        """Readiness: why the driver is not usable by kubelet yet, or None."""
        if self.verdict.registered is None:
            return "kubelet has not registered the driver yet"
        if not self.verdict.registered:
            return f"kubelet refused the registration: {self.verdict.error}"
        return None

    async def GetInfo(self, request: reg_pb2.InfoRequest, context: Context) -> reg_pb2.PluginInfo:
        log.info("kubelet asked for the plugin info (endpoint %s)", self.kubelet_socket)
        return reg_pb2.PluginInfo(
            type=PLUGIN_TYPE,
            name=DRIVER_NAME,
            endpoint=str(self.kubelet_socket),
            supported_versions=list(SUPPORTED_VERSIONS),
        )

    async def NotifyRegistrationStatus(
        self, request: reg_pb2.RegistrationStatus, context: Context
    ) -> reg_pb2.RegistrationStatusResponse:
        self.verdict = KubeletVerdict(request.plugin_registered, request.error)
        if request.plugin_registered:
            log.info("kubelet registered %s at %s", DRIVER_NAME, self.kubelet_socket)
        else:
            # kubelet does not retry by itself: a re-offered socket (driver restart) or a
            # kubelet restart is what tries again.
            log.error("kubelet refused to register %s: %s", DRIVER_NAME, request.error)
        return reg_pb2.RegistrationStatusResponse()
