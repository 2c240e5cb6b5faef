"""The csi DaemonSet as rendered by kustomize: the driver registers itself (no sidecar; the
registration dir and the socket's host path line up with its settings), and the node's store is
a chroot store in a host directory shared with the mesh DaemonSet (no host /nix), with the
driver's state beside it, not under its nix/ dir. Settings are read back through CsiSettings,
so a misspelt variable fails here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from niphas_csi.server import socket_path
from niphas_csi.settings import CsiSettings

BASE = Path(__file__).resolve().parents[2] / "deploy" / "kustomize" / "base"
KUBECTL = str(Path(sys.executable).with_name("kubectl"))


def pod_spec(component: str) -> dict[str, Any]:
    out = subprocess.run(
        [KUBECTL, "kustomize", str(BASE / component)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    [daemonset] = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "DaemonSet"]
    spec: dict[str, Any] = daemonset["spec"]["template"]["spec"]
    return spec


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def on_host(pod: dict[str, Any], container: dict[str, Any], path: str) -> PurePosixPath:
    """Where a path inside the container is on the node (through its hostPath mounts)."""
    inside = PurePosixPath(path)
    mounts = [m for m in container["volumeMounts"] if inside.is_relative_to(m["mountPath"])]
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return PurePosixPath(volume["hostPath"]["path"]) / inside.relative_to(mount["mountPath"])


def host_paths(pod: dict[str, Any]) -> list[PurePosixPath]:
    return [PurePosixPath(v["hostPath"]["path"]) for v in pod["volumes"] if "hostPath" in v]


@pytest.fixture(scope="module")
def csi() -> tuple[dict[str, Any], dict[str, Any], CsiSettings]:
    pod = pod_spec("csi")
    [container] = pod["containers"]  # the driver alone: no node-driver-registrar
    settings = CsiSettings.model_validate(
        {k.removeprefix("NIPHAS_CSI_").lower(): v for k, v in env_of(container).items()}
    )
    return pod, container, settings


def test_the_driver_registers_itself(
    csi: tuple[dict[str, Any], dict[str, Any], CsiSettings],
) -> None:
    pod, container, settings = csi
    assert settings.registration_dir is not None
    assert on_host(pod, container, str(settings.registration_dir)) == PurePosixPath(
        "/var/lib/kubelet/plugins_registry"
    )
    # kubelet dials the path GetInfo names: it must be where the endpoint's socket is on the node.
    endpoint = socket_path(settings.endpoint or "")
    assert settings.kubelet_socket is not None
    assert PurePosixPath(settings.kubelet_socket) == on_host(pod, container, str(endpoint))
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_the_store_is_a_chroot_store_in_a_host_dir_shared_with_the_mesh(
    csi: tuple[dict[str, Any], dict[str, Any], CsiSettings],
) -> None:
    pod, container, settings = csi
    mesh_pod = pod_spec("mesh")
    [mesh] = mesh_pod["containers"]
    for paths in (host_paths(pod), host_paths(mesh_pod)):
        assert not [p for p in paths if p.is_relative_to("/nix")], paths
    assert settings.store_root is not None
    store = on_host(pod, container, str(settings.store_root))
    assert store == PurePosixPath("/var/lib/niphas/store")
    # The mesh fills the store the driver mounts from, and its GC sees the driver's leases.
    assert on_host(mesh_pod, mesh, env_of(mesh)["NIPHAS_MESH_STORE_ROOT"]) == store
    state = on_host(pod, container, str(settings.state_dir / "csi"))
    assert not state.is_relative_to(store / "nix")  # overlayfs refuses overlapping layers
