"""The kustomize tree renders offline for every overlay, and every rendered object validates
strictly against the Kubernetes API schemas (kubernetes-validate, no cluster needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kustomize"
KUBECTL = str(Path(sys.executable).with_name("kubectl"))
OVERLAYS = ["base", "overlays/dev", "overlays/production"]
CLUSTER_SCOPED = {
    "Namespace",
    "CustomResourceDefinition",
    "CSIDriver",
    "ClusterRole",
    "ClusterRoleBinding",
    "PriorityClass",
}


def render(overlay: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [KUBECTL, "kustomize", str(DEPLOY / overlay)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renders_and_validates(overlay: str) -> None:
    objects = render(overlay)
    assert objects
    version = kubernetes_validate.latest_version()
    for obj in objects:
        if obj["apiVersion"].split("/")[0].endswith("niphas.io"):
            continue  # our own custom resources: the CRD's schema checks them in a cluster
        kubernetes_validate.validate(obj, version, strict=True)
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"].get("namespace") == "niphas-system", obj["metadata"]["name"]


def test_overlays_size_nats() -> None:
    dev = by_kind(render("overlays/dev"), "StatefulSet", "nats")
    prod = by_kind(render("overlays/production"), "StatefulSet", "nats")
    assert dev["spec"]["replicas"] == 1
    assert prod["spec"]["replicas"] == 3
    required = prod["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" in required


def test_ingress_is_denied_by_default() -> None:
    policy = by_kind(render("base"), "NetworkPolicy", "default-deny-ingress")
    assert policy["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}


def test_every_pod_template_is_selected_by_the_network_policies() -> None:
    workloads = [
        o for o in render("base") if o["kind"] in {"Deployment", "DaemonSet", "StatefulSet"}
    ]
    assert {o["metadata"]["name"] for o in workloads} >= {"nats"}
    for obj in workloads:
        labels = obj["spec"]["template"]["metadata"]["labels"]
        assert labels.get("app.kubernetes.io/part-of") == "niphas", obj["metadata"]["name"]


def _pod_templates(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    kinds = {"Deployment", "DaemonSet", "StatefulSet"}
    return [
        (o["metadata"]["name"], o["spec"]["template"]["spec"])
        for o in objects
        if o["kind"] in kinds
    ]


def test_least_privilege_and_secret_references() -> None:
    """Only the operator and the builder talk to the API (each with its own service account
    and RBAC); every other pod gets no token. Every service container reaches NATS with the
    user/password from the `niphas-nats` Secret the NATS servers use, except the cluster cache,
    which is no NATS client and gets no NATS credentials."""
    objects = render("base")
    bound = {
        s["name"]
        for o in objects
        if o["kind"] in {"RoleBinding", "ClusterRoleBinding"}
        for s in o["subjects"]
    }
    for name, pod in _pod_templates(objects):
        if name == "nats":
            continue
        account = pod.get("serviceAccountName")
        if account is None:
            assert pod.get("automountServiceAccountToken") is False, name
        else:
            assert account in bound, name
        for container in pod["containers"]:
            if container["name"] == "node-driver-registrar":
                continue
            if name == "niphas-cache":
                assert not any("NATS" in e["name"] for e in container["env"]), name
                continue
            env = {e["name"]: e for e in container.get("env", [])}
            secret = env["NIPHAS_NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]
            assert (secret["name"], secret["key"]) == ("niphas-nats", "password"), name
            assert "NIPHAS_NATS_USER" in env, name
