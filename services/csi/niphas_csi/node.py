"""The CSI Node service: kubelet's calls, translated into `Volumes` operations.

No staging step (ephemeral inline volumes have nothing to stage), no stats, no expansion. The
view is always read-only, whatever access mode or `readonly` flag kubelet sends (an inline
volume without `readOnly: true` arrives as SINGLE_NODE_WRITER, and must still work).
"""

from __future__ import annotations

import os

from .proto import csi_pb2, csi_pb2_grpc
from .request import validate_publish, validate_target, validate_volume_id
from .server_types import Context
from .volumes import Volumes


class NodeService(csi_pb2_grpc.NodeServicer):
    def __init__(
        self, volumes: Volumes, node_id: str, allowed_root: str | os.PathLike[str]
    ) -> None:
        self.volumes = volumes
        self.node_id = node_id
        self.allowed_root = allowed_root

    async def NodePublishVolume(
        self, request: csi_pb2.NodePublishVolumeRequest, context: Context
    ) -> csi_pb2.NodePublishVolumeResponse:
        capability = request.volume_capability
        publish = validate_publish(
            volume_id=request.volume_id,
            target_path=request.target_path,
            volume_context=dict(request.volume_context),
            has_mount_capability=request.HasField("volume_capability")
            and capability.HasField("mount"),
            has_block_capability=request.HasField("volume_capability")
            and capability.HasField("block"),
            staging_target_path=request.staging_target_path,
            allowed_root=self.allowed_root,
        )
        remaining = context.time_remaining()
        # Give up a little before kubelet does, so it reads our reason, not its own timeout.
        timeout_s = None if remaining is None else max(remaining - 0.5, 0.1)
        await self.volumes.publish(publish, timeout_s=timeout_s)
        return csi_pb2.NodePublishVolumeResponse()

    async def NodeUnpublishVolume(
        self, request: csi_pb2.NodeUnpublishVolumeRequest, context: Context
    ) -> csi_pb2.NodeUnpublishVolumeResponse:
        volume_id = validate_volume_id(request.volume_id)
        target = validate_target(request.target_path, self.allowed_root)
        await self.volumes.unpublish(volume_id, target)
        return csi_pb2.NodeUnpublishVolumeResponse()

    async def NodeGetCapabilities(
        self, request: csi_pb2.NodeGetCapabilitiesRequest, context: Context
    ) -> csi_pb2.NodeGetCapabilitiesResponse:
        return csi_pb2.NodeGetCapabilitiesResponse(capabilities=[])

    async def NodeGetInfo(
        self, request: csi_pb2.NodeGetInfoRequest, context: Context
    ) -> csi_pb2.NodeGetInfoResponse:
        return csi_pb2.NodeGetInfoResponse(node_id=self.node_id)
