"""The CSI Identity service: who we are, what we offer, whether we are ready."""

from __future__ import annotations

from collections.abc import Callable

from google.protobuf.wrappers_pb2 import BoolValue

from .proto import csi_pb2, csi_pb2_grpc
from .server_types import Context
from .settings import DRIVER_NAME


class IdentityService(csi_pb2_grpc.IdentityServicer):
    def __init__(self, version: str, ready: Callable[[], bool]) -> None:
        self.version = version
        self.ready = ready

    async def GetPluginInfo(
        self, request: csi_pb2.GetPluginInfoRequest, context: Context
    ) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(name=DRIVER_NAME, vendor_version=self.version)

    async def GetPluginCapabilities(
        self, request: csi_pb2.GetPluginCapabilitiesRequest, context: Context
    ) -> csi_pb2.GetPluginCapabilitiesResponse:
        # Node service only: no CONTROLLER_SERVICE (ephemeral volumes need no controller),
        # and no topology (every node can fetch every path through the mesh).
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=[])

    async def Probe(self, request: csi_pb2.ProbeRequest, context: Context) -> csi_pb2.ProbeResponse:
        return csi_pb2.ProbeResponse(ready=BoolValue(value=self.ready()))
