"""The committed protobuf code is what grpcio-tools makes of csi.proto and
pluginregistration.proto (version stamps aside); csi.proto keeps the CSI spec's package,
services, field numbers and enum values, pluginregistration.proto kubelet's."""

from __future__ import annotations

import re
from pathlib import Path

from niphas_csi.proto import csi_pb2
from niphas_csi.proto import pluginregistration_pb2 as reg_pb2
from niphas_csi.proto.generate import HERE, OUTPUTS, generate

_STAMPS = [
    re.compile(rb"# Protobuf Python Version: [0-9.]+"),
    re.compile(rb"GRPC_GENERATED_VERSION = '[0-9.]+'"),
    re.compile(rb"_runtime_version\.Domain\.PUBLIC,\s*\d+,\s*\d+,\s*\d+,"),
]


def _unstamped(content: bytes) -> bytes:
    # Another grpcio-tools release stamps its own version; the code itself must not drift.
    for stamp in _STAMPS:
        content = stamp.sub(b"<version>", content)
    return content


def test_generated_files_match_the_proto(tmp_path: Path) -> None:
    fresh = generate(tmp_path)
    for name in OUTPUTS:
        committed = (HERE / name).read_bytes()
        assert _unstamped(committed) == _unstamped(fresh[name]), (
            f"{name} is stale: run python -m niphas_csi.proto.generate"
        )


def test_wire_names_and_numbers_are_the_specs() -> None:
    file = csi_pb2.DESCRIPTOR
    assert file.package == "csi.v1"
    assert set(file.services_by_name) == {"Identity", "Node"}
    node = file.services_by_name["Node"]
    assert node.methods_by_name["NodePublishVolume"].input_type.full_name == (
        "csi.v1.NodePublishVolumeRequest"
    )
    fields = {f.name: f.number for f in csi_pb2.NodePublishVolumeRequest.DESCRIPTOR.fields}
    assert fields == {
        "volume_id": 1, "publish_context": 2, "staging_target_path": 3, "target_path": 4,
        "volume_capability": 5, "readonly": 6, "secrets": 7, "volume_context": 8,
    }  # fmt: skip
    assert {f.name: f.number for f in csi_pb2.VolumeCapability.DESCRIPTOR.fields} == {
        "block": 1, "mount": 2, "access_mode": 3,
    }  # fmt: skip
    assert csi_pb2.NodeGetInfoResponse.DESCRIPTOR.fields_by_name["node_id"].number == 1
    ready = csi_pb2.ProbeResponse.DESCRIPTOR.fields_by_name["ready"].message_type
    assert ready is not None
    assert ready.full_name == "google.protobuf.BoolValue"
    mode = csi_pb2.VolumeCapability.AccessMode.Mode
    assert mode.Value("MULTI_NODE_READER_ONLY") == 3
    assert csi_pb2.NodeServiceCapability.RPC.Type.Value("STAGE_UNSTAGE_VOLUME") == 1


def test_registration_wire_names_and_numbers_are_kubelets() -> None:
    file = reg_pb2.DESCRIPTOR
    assert file.package == "pluginregistration"  # kubelet calls /pluginregistration.Registration/
    service = file.services_by_name["Registration"]
    assert {m.name: (m.input_type.name, m.output_type.name) for m in service.methods} == {
        "GetInfo": ("InfoRequest", "PluginInfo"),
        "NotifyRegistrationStatus": ("RegistrationStatus", "RegistrationStatusResponse"),
    }
    assert {f.name: f.number for f in reg_pb2.PluginInfo.DESCRIPTOR.fields} == {
        "type": 1, "name": 2, "endpoint": 3, "supported_versions": 4,
    }  # fmt: skip
    assert {f.name: f.number for f in reg_pb2.RegistrationStatus.DESCRIPTOR.fields} == {
        "plugin_registered": 1, "error": 2,
    }  # fmt: skip
