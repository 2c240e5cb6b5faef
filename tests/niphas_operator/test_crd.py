"""The NiphasWorkload CRD on a real kube-apiserver, driven with kubectl: a valid workload is
accepted, invalid ones are rejected by the structural schema, `kubectl get nw` shows the
printer columns, and `kubectl scale` reaches the Deployment through the scale subresource
(with the operator running)."""

from __future__ import annotations

import pytest

from niphas_operator.settings import OperatorSettings
from tests.helpers import eventually
from tests.niphas_operator.conftest import Kubectl, OperatorRunner, store_path, workload

pytestmark = pytest.mark.slow


def test_valid_workload_is_accepted_and_listed_with_printer_columns(kubectl: Kubectl) -> None:
    out = kubectl.apply(workload("web", storePath=store_path("web-1.0")))
    assert "niphasworkload.niphas.io/web created" in out
    listing = kubectl("get", "nw")
    header = listing.splitlines()[0].split()
    assert header == [
        "NAME",
        "FLAKE",
        "ATTRIBUTE",
        "STORE-PATH",
        "PHASE",
        "REASON",
        "READY",
        "AGE",
    ]
    assert "git+file:///srv/git/demo.git" in listing
    # The second short name works too.
    assert "web" in kubectl("get", "niphas")


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ({"replicas": "three"}, "spec.replicas"),
        ({"replicas": -1}, "spec.replicas"),
        ({"storePath": "/usr/bin/sh"}, "spec.storePath"),
        ({"flakeRef": "not a flake"}, "spec.flakeRef"),
        ({"revision": "main"}, "spec.revision"),
        ({"service": {"type": "Weird", "ports": [{"port": 80}]}}, "spec.service.type"),
    ],
)
def test_invalid_workloads_are_rejected_by_the_schema(
    kubectl: Kubectl, spec: dict[str, object], complaint: str
) -> None:
    # --validate=false: the API server's structural schema must reject it, not kubectl.
    out = kubectl.apply(workload("bad", **spec), False, "--validate=false")
    assert "is invalid" in out, out
    assert complaint in out
    assert kubectl.get("nw", "bad") is None


def test_missing_attribute_is_rejected(kubectl: Kubectl) -> None:
    manifest = workload("bad")
    del manifest["spec"]["attribute"]
    out = kubectl.apply(manifest, False, "--validate=false")
    assert "spec.attribute" in out and "Required" in out, out


async def test_kubectl_scale_changes_the_deployment(
    kubectl: Kubectl, operator_settings: OperatorSettings, running_operator: OperatorRunner
) -> None:
    kubectl.apply(workload("web", storePath=store_path("web-1.0")))
    async with running_operator(operator_settings):
        await eventually(lambda: kubectl.get("deployment", "web") is not None, 30)
        assert kubectl.get("deployment", "web")["spec"]["replicas"] == 1  # type: ignore[index]
        kubectl("scale", "nw/web", "--replicas", "3")

        def scaled() -> bool:
            deployment = kubectl.get("deployment", "web")
            return deployment is not None and deployment["spec"]["replicas"] == 3

        await eventually(scaled, 30)
        # Three replicas also get a PodDisruptionBudget; the scale subresource reads back.
        await eventually(lambda: kubectl.get("pdb", "web") is not None, 30)
        scale = kubectl(
            "get",
            "--raw",
            f"/apis/niphas.io/v1alpha1/namespaces/{kubectl.namespace}/niphasworkloads/web/scale",
        )
        assert '"replicas":3' in scale
