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
        ({"attribute": "packages..default"}, "spec.attribute"),
        ({"attribute": "packages.x86_64-linux.default."}, "spec.attribute"),
        ({"ingress": {"host": "Web_Site", "port": 80}}, "spec.ingress.host"),
        ({"ingress": {"host": "web.example.com", "port": 0}}, "spec.ingress.port"),
        ({"ingress": {"host": "web.example.com"}}, "spec.ingress.port"),
        ({"ingress": {"host": "a.b", "port": 80, "path": "x"}}, "spec.ingress.path"),
        ({"ingress": {"host": "a.b", "port": 80, "pathType": "Glob"}}, "spec.ingress.pathType"),
        ({"extraVolumes": [{"name": "Data_1", "emptyDir": {}}]}, "spec.extraVolumes.name"),
        (
            {"extraVolumeMounts": [{"name": "data", "mountPath": "data"}]},
            "spec.extraVolumeMounts.mountPath",
        ),
        ({"extraVolumeMounts": [{"name": "data"}]}, "spec.extraVolumeMounts.mountPath"),
        ({"binaryCache": {"url": "ftp://cache"}}, "spec.binaryCache.url"),
        ({"binaryCache": {"url": "s3://bucket"}}, "spec.binaryCache.url"),
        ({"binaryCache": {"url": "https://c/x?priority=1"}}, "spec.binaryCache.url"),
        ({"binaryCache": {"url": "https://c", "publicKey": "nokey"}}, "spec.binaryCache.publicKey"),
        ({"architectures": ["sparc"]}, "spec.architectures"),
        ({"architectures": []}, "spec.architectures"),
        ({"architectures": ["amd64", "amd64"]}, "spec.architectures[1]"),
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


def test_invalid_values_name_the_accepted_form(kubectl: Kubectl) -> None:
    out = kubectl.apply(
        workload("bad", attribute="a b", architectures=["sparc"]), False, "--validate=false"
    )
    # The field, the value, and what would be accepted (the pattern, the allowed values).
    assert 'spec.attribute: Invalid value: "a b"' in out, out
    assert "should match" in out
    assert 'spec.architectures: Unsupported value: "sparc"' in out
    assert '"amd64", "arm64"' in out


def test_dotted_attributes_and_every_new_field_are_accepted(kubectl: Kubectl) -> None:
    spec = {
        "attribute": "packages.x86_64-linux.default",
        "ingress": {"host": "web.example.com", "port": 80, "tlsSecretName": "web-tls"},
        "service": {"ports": [{"port": 80, "targetPort": 8080}]},
        "extraVolumes": [{"name": "data", "emptyDir": {"medium": "Memory"}}],
        "extraVolumeMounts": [{"name": "data", "mountPath": "/var/lib/web"}],
        "binaryCache": {
            "url": "https://cache.example.com",
            "publicKey": "cache.example.com-1:" + "A" * 43 + "=",
        },
        "architectures": ["amd64", "arm64"],
    }
    kubectl.apply(workload("full", storePath=store_path("web-1.0"), **spec))
    stored = kubectl.get("nw", "full")
    assert stored is not None
    assert stored["spec"]["attribute"] == "packages.x86_64-linux.default"
    # Defaults the server fills in; the unknown fields of a Volume are kept.
    assert stored["spec"]["ingress"]["path"] == "/"
    assert stored["spec"]["ingress"]["pathType"] == "Prefix"
    assert stored["spec"]["extraVolumes"][0]["emptyDir"] == {"medium": "Memory"}


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
