"""What kubelet's plugin watcher does with a socket in `plugins_registry` (Kubernetes 1.20,
pkg/kubelet/pluginmanager/operationexecutor/operation_generator.go and the CSI handler in
pkg/volume/csi/csi_plugin.go), step by step, with the same timeouts: dial the registration
socket (10 s), GetInfo (1 s), validate the answer as the CSI handler does, dial the endpoint it
names and call NodeGetInfo, then NotifyRegistrationStatus with the outcome."""

from __future__ import annotations

import asyncio
import stat
from dataclasses import dataclass
from pathlib import Path

import grpc

from niphas_csi.proto import csi_pb2, csi_pb2_grpc
from niphas_csi.proto import pluginregistration_pb2 as reg_pb2
from niphas_csi.proto import pluginregistration_pb2_grpc as reg_grpc

DIAL_TIMEOUT_S = 10
CALL_TIMEOUT_S = 1


@dataclass
class Registered:
    name: str
    endpoint: str
    node_id: str


def validate(info: reg_pb2.PluginInfo) -> str | None:
    """kubelet's checks, as the message it would send back; None when the plugin is valid."""
    if info.type != "CSIPlugin":
        return f"no handler registered for plugin type: {info.type}"
    majors = [v.split(".")[0] for v in info.supported_versions]
    if "1" not in majors:  # kubelet >= 1.17 speaks only CSI 1.x
        return f"None of the versions specified {list(info.supported_versions)} are supported"
    return None


async def register(registration_socket: Path, *, refuse: str = "") -> Registered:
    """One registration attempt; `refuse` makes this kubelet report that error instead (as when
    its own registration step failed). Raises what kubelet would log."""
    async with grpc.aio.insecure_channel(f"unix://{registration_socket}") as channel:
        await asyncio.wait_for(channel.channel_ready(), DIAL_TIMEOUT_S)  # grpc.WithBlock
        client = reg_grpc.RegistrationStub(channel)  # type: ignore[no-untyped-call]
        info: reg_pb2.PluginInfo = await client.GetInfo(
            reg_pb2.InfoRequest(), timeout=CALL_TIMEOUT_S
        )
        problem = validate(info) or refuse
        if not problem:
            try:
                node_id = await node_get_info(Path(info.endpoint))
            except (grpc.aio.AioRpcError, ValueError) as exc:
                problem = f"plugin registration failed with err: {exc}"
        status = reg_pb2.RegistrationStatus(plugin_registered=not problem, error=problem)
        await client.NotifyRegistrationStatus(status, timeout=CALL_TIMEOUT_S)
        if problem:
            raise RuntimeError(problem)
        return Registered(info.name, info.endpoint, node_id)


async def node_get_info(endpoint: Path) -> str:
    """kubelet dials the endpoint as a unix socket path on its own file system."""
    if not endpoint.is_absolute() or not stat.S_ISSOCK(endpoint.stat().st_mode):
        raise ValueError(f"endpoint {endpoint} is not a socket")
    async with grpc.aio.insecure_channel(f"unix://{endpoint}") as channel:
        node = csi_pb2_grpc.NodeStub(channel)  # type: ignore[no-untyped-call]
        info: csi_pb2.NodeGetInfoResponse = await node.NodeGetInfo(
            csi_pb2.NodeGetInfoRequest(), timeout=DIAL_TIMEOUT_S
        )
        return info.node_id
