"""The objects a workload owns, as plain manifests: Deployment, Service, PodDisruptionBudget.

Pure functions of the workload and the store path it runs; the workload store makes them
real (server-side apply in a cluster, files for GitOps in render mode). Everything the pod
runs comes from the closure, mounted read-only at /nix/store by the `csi.niphas.io` inline
volume; the container image is a fixed stub that never changes with the app.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from niphas_operator.workload import Workload

CLOSURE_VOLUME = "nix-closure"
STORE_MOUNT = "/nix/store"
STORE_PATH_ANNOTATION = "niphas.io/store-path"


@dataclass(frozen=True)
class PodSettings:
    """What the operator adds to every pod, from its settings."""

    stub_image: str
    csi_driver: str
    store_node_label: tuple[str, str]


def resolved_command(workload: Workload, store_path: str, main_program: str) -> list[str]:
    """spec.command when given, else `<storePath>/bin/<mainProgram>`."""
    if workload.spec.command:
        return list(workload.spec.command)
    return [f"{store_path}/bin/{main_program}"]


def _metadata(workload: Workload, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": workload.namespace,
        "labels": workload.labels(),
        "ownerReferences": [workload.owner_reference()],
    }


TRACEPARENT_ATTRIBUTE = "traceparent"
"""Volume attribute carrying the trace of the build that moved the workload, so the CSI
driver's mount (and the fetch it asks the mesh for) joins the trace that began at the push."""


def deployment(
    workload: Workload,
    store_path: str,
    command: list[str],
    pod: PodSettings,
    traceparent: str | None = None,
) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(workload, workload.name),
        "spec": {
            "replicas": workload.spec.replicas,
            "selector": {"matchLabels": workload.selector()},
            "template": {
                "metadata": {
                    "labels": workload.labels(),
                    "annotations": {STORE_PATH_ANNOTATION: store_path},
                },
                "spec": _pod_spec(workload, store_path, command, pod, traceparent),
            },
        },
    }


def _pod_spec(
    workload: Workload,
    store_path: str,
    command: list[str],
    pod: PodSettings,
    traceparent: str | None,
) -> dict[str, Any]:
    spec = workload.spec
    attributes = {"storePath": store_path}
    if traceparent:
        attributes[TRACEPARENT_ATTRIBUTE] = traceparent
    key, value = pod.store_node_label
    pod_spec: dict[str, Any] = {
        "containers": [_container(workload, command, pod)],
        "nodeSelector": {**spec.node_selector, key: value},
        "volumes": [
            {
                "name": CLOSURE_VOLUME,
                "csi": {
                    "driver": pod.csi_driver,
                    "readOnly": True,
                    "volumeAttributes": attributes,
                },
            }
        ],
    }
    if spec.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in spec.tolerations]
    if spec.affinity:
        pod_spec["affinity"] = spec.affinity
    if spec.service_account_name:
        pod_spec["serviceAccountName"] = spec.service_account_name
    return pod_spec


def _container(workload: Workload, command: list[str], pod: PodSettings) -> dict[str, Any]:
    spec = workload.spec
    container: dict[str, Any] = {
        "name": "app",
        "image": pod.stub_image,
        "command": command,
        "volumeMounts": [{"name": CLOSURE_VOLUME, "mountPath": STORE_MOUNT, "readOnly": True}],
    }
    if spec.args:
        container["args"] = list(spec.args)
    if spec.env:
        container["env"] = [dict(e) for e in spec.env]
    if spec.ports:
        container["ports"] = [dict(p) for p in spec.ports]
    if spec.resources:
        container["resources"] = spec.resources
    probes = {
        "livenessProbe": spec.liveness_probe,
        "readinessProbe": spec.readiness_probe,
        "startupProbe": spec.startup_probe,
    }
    container.update({name: probe for name, probe in probes.items() if probe})
    return container


def service(workload: Workload) -> dict[str, Any] | None:
    wanted = workload.spec.service
    if wanted is None:
        return None
    ports = []
    for p in wanted.ports:
        port: dict[str, Any] = {"port": p.port, "protocol": p.protocol or "TCP"}
        if p.name:
            port["name"] = p.name
        port["targetPort"] = p.target_port if p.target_port is not None else p.port
        ports.append(port)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(workload, workload.name),
        "spec": {"type": wanted.type, "selector": workload.selector(), "ports": ports},
    }


def disruption_budget(workload: Workload, api_version: str) -> dict[str, Any] | None:
    """One pod may be disrupted at a time, and only when there are two or more.
    `api_version`: policy/v1 where served (Kubernetes >= 1.21), else policy/v1beta1."""
    if workload.spec.replicas < 2:
        return None
    return {
        "apiVersion": api_version,
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(workload, workload.name),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": workload.selector()}},
    }


def store_path_of(deployment_obj: dict[str, Any]) -> str | None:
    """The store path a live Deployment runs (from its pod template)."""
    template = (deployment_obj.get("spec") or {}).get("template") or {}
    annotations = (template.get("metadata") or {}).get("annotations") or {}
    value = annotations.get(STORE_PATH_ANNOTATION)
    return value if isinstance(value, str) else None
