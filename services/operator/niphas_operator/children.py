"""The objects a workload owns, as plain manifests: Deployment(s), Service, Ingress,
PodDisruptionBudget; and the ConfigMap of the pods' minimal /etc, one per namespace.

Pure functions of the workload and the store path it runs; the workload store makes them
real (server-side apply in a cluster, files for GitOps in render mode). Everything the pod
runs comes from the closure, mounted read-only at /nix/store by the `csi.niphas.io` inline
volume; the container image is a fixed stub that never changes with the app, so the pod
also gets what a program from a closure expects of a system and a stub image lacks: a
writable /tmp and a minimal /etc (passwd, group, nsswitch.conf, CA certificates). That /etc
is the same for every workload, so the workloads of a namespace share one ConfigMap
(`ETC_NAME`) instead of each storing its own copy of a CA bundle of a few hundred kilobytes.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Any, Final

from niphas_operator.workload import ARCH_LABEL, ARCH_POD_LABEL, MANAGED_BY, Workload

CLOSURE_VOLUME = "nix-closure"
STORE_MOUNT = "/nix/store"
STORE_PATH_ANNOTATION = "niphas.io/store-path"
TMP_VOLUME = "niphas-tmp"
ETC_VOLUME = "niphas-etc"
ETC_NAME = "niphas-etc"
"""The ConfigMap of the pods' /etc, shared by every workload of its namespace."""
RESERVED_VOLUMES: Final = (CLOSURE_VOLUME, TMP_VOLUME, ETC_VOLUME)
CA_FILE = "/etc/ssl/certs/ca-certificates.crt"
ETC_DIGEST_ANNOTATION = "niphas.io/etc-digest"
NOT_READY_TAINTS: Final = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")

PASSWD = (
    "root:x:0:0:root:/root:/noshell\n"
    "app:x:65535:65535:app:/tmp:/noshell\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/noshell\n"
)
GROUP = "root:x:0:\napp:x:65535:\nnogroup:x:65534:\n"
NSSWITCH = (
    "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n"
    "networks: files\nprotocols: files\nservices: files\n"
)
"""The minimal /etc: root, the stub image's user (65535) and nobody; name lookups from files
and DNS only (no NSS modules a closure's libc would have to load)."""


@dataclass(frozen=True)
class PodSettings:
    """What the operator adds to every pod, from its settings."""

    stub_image: str
    csi_driver: str
    store_node_label: tuple[str, str]
    not_ready_toleration_s: int = 60
    ca_bundle: str | None = None
    """PEM CA certificates for the pods' /etc/ssl/certs (None: none are given)."""


def deployment_name(workload: Workload, architecture: str | None) -> str:
    """`<name>`, or `<name>-<architecture>` for each Deployment of a multi-arch workload."""
    return workload.name if architecture is None else f"{workload.name}-{architecture}"


def former_etc_name(workload: Workload) -> str:
    """The per-workload /etc ConfigMap of earlier operators, which an upgraded one deletes."""
    return f"{workload.name}-niphas-etc"


def invalid_spec(workload: Workload) -> str | None:
    """What the CRD's schema cannot check across fields, as a sentence naming the field."""
    spec = workload.spec
    for i, volume in enumerate(spec.extra_volumes):
        if volume.get("name") in RESERVED_VOLUMES or str(volume.get("name")).startswith("niphas-"):
            return (
                f"spec.extraVolumes[{i}].name: {volume.get('name')!r} is reserved "
                f"(names starting with niphas- and {CLOSURE_VOLUME!r} are the operator's)"
            )
    names = {str(v.get("name")) for v in spec.extra_volumes}
    for i, mount in enumerate(spec.extra_volume_mounts):
        path = str(mount.get("mountPath", "")).rstrip("/")
        if path == STORE_MOUNT or path.startswith(STORE_MOUNT + "/") or path == "/nix":
            return f"spec.extraVolumeMounts[{i}].mountPath: {path} is the closure's mount"
        if mount.get("name") not in names:
            return (
                f"spec.extraVolumeMounts[{i}].name: {mount.get('name')!r} names no volume of "
                f"spec.extraVolumes"
            )
    ingress, service_spec = spec.ingress, spec.service
    if ingress is not None and service_spec is not None:
        ports = [p.port for p in service_spec.ports]
        if ingress.port not in ports:
            return (
                f"spec.ingress.port: {ingress.port} is not a port of spec.service "
                f"({', '.join(map(str, ports))})"
            )
    return None


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
CACHE_ATTRIBUTE = "binaryCache"
"""Volume attribute: the workload's own binary cache (`spec.binaryCache.url`), for the node
to substitute this closure from."""
CACHE_KEY_ATTRIBUTE = "binaryCachePublicKey"
"""Volume attribute: the public key that cache's paths are signed with."""


def deployment(
    workload: Workload,
    store_path: str,
    command: list[str],
    pod: PodSettings,
    traceparent: str | None = None,
    architecture: str | None = None,
) -> dict[str, Any]:
    """The Deployment running `store_path`; for a multi-architecture workload, the one of
    `architecture` (its own name, pod label and node selector)."""
    labels = workload.labels()
    selector = workload.selector()
    if architecture is not None:
        labels = {**labels, ARCH_POD_LABEL: architecture}
        selector = {**selector, ARCH_POD_LABEL: architecture}
    annotations = {STORE_PATH_ANNOTATION: store_path}
    if pod.ca_bundle is not None:
        # The /etc content changes the pods: a new CA bundle rolls them out.
        annotations[ETC_DIGEST_ANNOTATION] = etc_digest(pod)
    metadata = _metadata(workload, deployment_name(workload, architecture))
    metadata["labels"] = labels
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": workload.spec.replicas,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": labels, "annotations": annotations},
                "spec": _pod_spec(
                    workload, store_path, command, pod, traceparent, architecture, selector
                ),
            },
        },
    }


def _pod_spec(
    workload: Workload,
    store_path: str,
    command: list[str],
    pod: PodSettings,
    traceparent: str | None,
    architecture: str | None,
    selector: dict[str, str],
) -> dict[str, Any]:
    spec = workload.spec
    attributes = {"storePath": store_path}
    if traceparent:
        attributes[TRACEPARENT_ATTRIBUTE] = traceparent
    if spec.binary_cache is not None:
        attributes[CACHE_ATTRIBUTE] = spec.binary_cache.url
        if spec.binary_cache.public_key:
            attributes[CACHE_KEY_ATTRIBUTE] = spec.binary_cache.public_key
    key, value = pod.store_node_label
    node_selector = {**spec.node_selector, key: value}
    if architecture is not None:
        node_selector[ARCH_LABEL] = architecture
    mounted = {str(m.get("mountPath", "")).rstrip("/") for m in spec.extra_volume_mounts}
    volumes: list[dict[str, Any]] = [
        {
            "name": CLOSURE_VOLUME,
            "csi": {"driver": pod.csi_driver, "readOnly": True, "volumeAttributes": attributes},
        }
    ]
    if "/tmp" not in mounted:
        volumes.append({"name": TMP_VOLUME, "emptyDir": {}})
    volumes.append({"name": ETC_VOLUME, "configMap": {"name": ETC_NAME}})
    volumes.extend(dict(v) for v in spec.extra_volumes)
    pod_spec: dict[str, Any] = {
        "containers": [_container(workload, command, pod, mounted)],
        "nodeSelector": node_selector,
        "volumes": volumes,
        "tolerations": _tolerations(workload, pod),
    }
    if spec.replicas >= 2:
        pod_spec["topologySpreadConstraints"] = [
            {
                "maxSkew": 1,
                "topologyKey": "kubernetes.io/hostname",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": selector},
            }
        ]
    if spec.affinity:
        pod_spec["affinity"] = spec.affinity
    if spec.service_account_name:
        pod_spec["serviceAccountName"] = spec.service_account_name
    return pod_spec


def _tolerations(workload: Workload, pod: PodSettings) -> list[dict[str, Any]]:
    """The spec's tolerations, plus leaving a not-ready or unreachable node after
    `not_ready_toleration_s` (unless the spec says otherwise for that taint)."""
    tolerations = [dict(t) for t in workload.spec.tolerations]
    named = {t.get("key") for t in tolerations}
    for taint in NOT_READY_TAINTS:
        if taint not in named:
            tolerations.append(
                {
                    "key": taint,
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": pod.not_ready_toleration_s,
                }
            )
    return tolerations


def _container(
    workload: Workload, command: list[str], pod: PodSettings, mounted: set[str]
) -> dict[str, Any]:
    spec = workload.spec
    mounts: list[dict[str, Any]] = [
        {"name": CLOSURE_VOLUME, "mountPath": STORE_MOUNT, "readOnly": True}
    ]
    if "/tmp" not in mounted:
        mounts.append({"name": TMP_VOLUME, "mountPath": "/tmp"})
    for file, path in _etc_files(pod):
        if path not in mounted:
            mounts.append(
                {"name": ETC_VOLUME, "mountPath": path, "subPath": file, "readOnly": True}
            )
    mounts.extend(dict(m) for m in spec.extra_volume_mounts)
    container: dict[str, Any] = {
        "name": "app",
        "image": pod.stub_image,
        "command": command,
        "volumeMounts": mounts,
    }
    if spec.args:
        container["args"] = list(spec.args)
    env = [dict(e) for e in spec.env]
    if pod.ca_bundle is not None:
        named = {e.get("name") for e in env}
        env.extend(
            {"name": name, "value": CA_FILE}
            for name in ("SSL_CERT_FILE", "NIX_SSL_CERT_FILE")
            if name not in named
        )
    if env:
        container["env"] = env
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


def _etc_files(pod: PodSettings) -> list[tuple[str, str]]:
    files = [("passwd", "/etc/passwd"), ("group", "/etc/group"),
             ("nsswitch.conf", "/etc/nsswitch.conf")]  # fmt: skip
    if pod.ca_bundle is not None:
        files.append(("ca-certificates.crt", CA_FILE))
    return files


def etc_data(pod: PodSettings) -> dict[str, str]:
    data = {"passwd": PASSWD, "group": GROUP, "nsswitch.conf": NSSWITCH}
    if pod.ca_bundle is not None:
        data["ca-certificates.crt"] = pod.ca_bundle
    return data


@functools.lru_cache(maxsize=4)
def etc_digest(pod: PodSettings) -> str:
    # Cached: the repr of a CA bundle of a few hundred kilobytes took milliseconds per
    # call, three calls per reconcile; the settings do not change while the process runs.
    return hashlib.sha256(repr(sorted(etc_data(pod).items())).encode()).hexdigest()[:16]


def etc_config_map(namespace: str, pod: PodSettings) -> dict[str, Any]:
    """The pods' minimal /etc in `namespace`, one file per key (mounted one by one with
    subPath, so the kubelet's /etc/hosts and /etc/resolv.conf stay as they are). Shared by
    the namespace's workloads: no owner reference (the operator deletes it with the last
    workload); the Deployments carry its digest, so a new CA bundle still rolls their pods."""
    metadata = {
        "name": ETC_NAME,
        "namespace": namespace,
        "labels": {
            "app.kubernetes.io/managed-by": MANAGED_BY,
            "app.kubernetes.io/component": "pod-etc",
        },
        "annotations": {ETC_DIGEST_ANNOTATION: etc_digest(pod)},
    }
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": etc_data(pod)}


def service(workload: Workload) -> dict[str, Any] | None:
    """The Service of `spec.service`; with only `spec.ingress`, a ClusterIP Service of the
    ingress's port (the pods' port of the same number)."""
    wanted = workload.spec.service
    ingress = workload.spec.ingress
    if wanted is None and ingress is None:
        return None
    ports = []
    if wanted is None:
        assert ingress is not None
        ports.append({"name": "http", "port": ingress.port, "protocol": "TCP",
                      "targetPort": ingress.port})  # fmt: skip
        kind = "ClusterIP"
    else:
        kind = wanted.type
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
        "spec": {"type": kind, "selector": workload.selector(), "ports": ports},
    }


def ingress(workload: Workload) -> dict[str, Any] | None:
    """`spec.ingress`: requests for its host (and path) routed to the workload's Service."""
    wanted = workload.spec.ingress
    if wanted is None:
        return None
    backend = {"service": {"name": workload.name, "port": {"number": wanted.port}}}
    spec: dict[str, Any] = {
        "rules": [
            {
                "host": wanted.host,
                "http": {
                    "paths": [
                        {"path": wanted.path, "pathType": wanted.path_type, "backend": backend}
                    ]
                },
            }
        ]
    }
    if wanted.class_name:
        spec["ingressClassName"] = wanted.class_name
    if wanted.tls_secret_name:
        spec["tls"] = [{"hosts": [wanted.host], "secretName": wanted.tls_secret_name}]
    metadata = _metadata(workload, workload.name)
    if wanted.annotations:
        metadata["annotations"] = dict(wanted.annotations)
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": metadata,
        "spec": spec,
    }


def disruption_budget(
    workload: Workload, api_version: str, *, unhealthy_always_allow: bool = False
) -> dict[str, Any] | None:
    """One pod may be disrupted at a time, and only when there are two or more.
    `api_version`: policy/v1 where served (Kubernetes >= 1.21), else policy/v1beta1.
    `unhealthy_always_allow` where the cluster keeps `unhealthyPodEvictionPolicy`: pods that
    are not ready never block draining a node."""
    if workload.spec.replicas < 2:
        return None
    spec: dict[str, Any] = {"maxUnavailable": 1, "selector": {"matchLabels": workload.selector()}}
    if unhealthy_always_allow:
        spec["unhealthyPodEvictionPolicy"] = "AlwaysAllow"
    return {
        "apiVersion": api_version,
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(workload, workload.name),
        "spec": spec,
    }


def store_path_of(deployment_obj: dict[str, Any]) -> str | None:
    """The store path a live Deployment runs (from its pod template)."""
    template = (deployment_obj.get("spec") or {}).get("template") or {}
    annotations = (template.get("metadata") or {}).get("annotations") or {}
    value = annotations.get(STORE_PATH_ANNOTATION)
    return value if isinstance(value, str) else None
