"""The kustomize base as a real API server takes it: a server-side dry-run apply of every
rendered object against the test kube-apiserver (built from Debian's source; schema
validation, defaulting and admission run, nothing is stored)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.deploy.test_kustomize import render
from tests.kube_harness import KubeApiServer

NAMESPACE = "niphas-system"


def served_versions(kube: KubeApiServer) -> set[str]:
    return set(kube.kubectl("api-versions").stdout.split())


def for_this_server(obj: dict[str, Any], versions: set[str]) -> dict[str, Any]:
    """The test server is Kubernetes 1.20, which serves PodDisruptionBudget only as
    policy/v1beta1 (same fields for what we set); current clusters serve policy/v1."""
    if obj["apiVersion"] == "policy/v1" and "policy/v1" not in versions:
        return {**obj, "apiVersion": "policy/v1beta1"}
    return obj


@pytest.mark.slow
def test_base_passes_a_server_side_dry_run(kube_apiserver: KubeApiServer) -> None:
    versions = served_versions(kube_apiserver)
    objects = [for_this_server(o, versions) for o in render("base")]
    # A dry-run creates nothing, so the namespace and the CRD that later objects live in are
    # applied for real first, then everything is dry-run.
    first = [o for o in objects if o["kind"] in {"Namespace", "CustomResourceDefinition"}]
    assert first, "the base holds its namespace and the CRD"
    kube_apiserver.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump_all(first))
    result = kube_apiserver.kubectl(
        "apply", "--server-side", "--dry-run=server", "--field-manager=niphas-deploy-test",
        "-f", "-", input=yaml.safe_dump_all(objects), check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    applied = [line for line in result.stdout.splitlines() if "(server dry run)" in line]
    assert len(applied) == len(objects), result.stdout
    kinds = {o["kind"] for o in objects}
    assert {"StatefulSet", "DaemonSet", "Deployment", "CSIDriver", "NetworkPolicy"} <= kinds
    # Nothing but what was applied for real exists afterwards.
    listed = kube_apiserver.kubectl("get", "statefulsets,daemonsets", "-n", NAMESPACE, "-o", "name")
    assert listed.stdout.strip() == ""
