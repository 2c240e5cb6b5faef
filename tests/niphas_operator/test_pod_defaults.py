"""What the operator applies for a workload, on a real kube-apiserver: the pod defaults
(not-ready/unreachable tolerations, topology spread for two or more replicas, a writable /tmp,
the minimal /etc from a ConfigMap, CA certificates), the PodDisruptionBudget with
`unhealthyPodEvictionPolicy` only where the server keeps it (this 1.20 server does not),
spec.ingress as an Ingress routing its host to the Service, extraVolumes/extraVolumeMounts,
the per-workload binary cache on the closure volume; a workload of an earlier operator's
fields only keeps working; a spec the schema cannot check across fields is Failed with the
field named, and nothing is applied."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from niphas_common.kube.config import connect
from niphas_operator.children import PASSWD, disruption_budget
from niphas_operator.kubernetes_store import keeps_unhealthy_policy
from niphas_operator.settings import OperatorSettings
from niphas_operator.workload import Workload
from tests.helpers import eventually
from tests.kube_harness import KubeApiServer
from tests.niphas_operator.conftest import Kubectl, OperatorRunner, store_path, workload

pytestmark = pytest.mark.slow

CA = "-----BEGIN CERTIFICATE-----\nMIIBtest\n-----END CERTIFICATE-----\n"


def _pod(kubectl: Kubectl, name: str) -> dict[str, Any]:
    deployment = kubectl.get("deployment", name)
    assert deployment is not None
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


async def test_pod_defaults_ingress_volumes_and_cache(
    kubectl: Kubectl,
    crd: KubeApiServer,
    operator_settings: OperatorSettings,
    running_operator: OperatorRunner,
    tmp_path: Path,
) -> None:
    bundle = tmp_path / "ca.crt"
    bundle.write_text(CA)
    settings = operator_settings.model_copy(
        update={"ca_bundle_file": bundle, "not_ready_toleration_s": 30}
    )
    key = "cache.example.com-1:" + "A" * 43 + "="
    kubectl.apply(
        workload(
            "web",
            storePath=store_path("web-1.0"),
            replicas=2,
            ingress={"host": "web.example.com", "port": 8080, "className": "nginx"},
            extraVolumes=[{"name": "data", "emptyDir": {}}],
            extraVolumeMounts=[{"name": "data", "mountPath": "/var/lib/web"}],
            binaryCache={"url": "https://cache.example.com", "publicKey": key},
            tolerations=[
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists",
                 "effect": "NoExecute", "tolerationSeconds": 5},
            ],
        )
    )  # fmt: skip
    kubectl.apply(workload("plain", storePath=store_path("plain-1.0")))
    async with running_operator(settings):
        await eventually(lambda: kubectl.get("ingress", "web") is not None, 30)
        await eventually(lambda: kubectl.get("deployment", "plain") is not None, 30)
        # Its status is written after the Deployment: wait for it before stopping.
        await eventually(lambda: "status" in (kubectl.get("nw", "plain") or {}), 30)
        await eventually(lambda: kubectl.get("pdb", "web") is not None, 30)

    pod = _pod(kubectl, "web")
    tolerations = {t["key"]: t for t in pod["tolerations"]}
    assert tolerations["node.kubernetes.io/not-ready"]["tolerationSeconds"] == 30
    assert tolerations["node.kubernetes.io/not-ready"]["effect"] == "NoExecute"
    # The workload's own toleration of a taint wins over the default.
    assert tolerations["node.kubernetes.io/unreachable"]["tolerationSeconds"] == 5
    assert len(pod["tolerations"]) == 2
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["labelSelector"]["matchLabels"] == {"niphas.io/workload": "web"}

    volumes = {v["name"]: v for v in pod["volumes"]}
    assert pod["volumes"][0]["name"] == "nix-closure"
    attributes = volumes["nix-closure"]["csi"]["volumeAttributes"]
    assert attributes["binaryCache"] == "https://cache.example.com"
    assert attributes["binaryCachePublicKey"] == key
    assert "emptyDir" in volumes["niphas-tmp"]
    assert volumes["niphas-etc"]["configMap"]["name"] == "niphas-etc"
    assert volumes["data"] == {"name": "data", "emptyDir": {}}
    container = pod["containers"][0]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/nix/store"]["readOnly"] is True
    assert mounts["/tmp"]["name"] == "niphas-tmp"
    assert mounts["/etc/passwd"]["subPath"] == "passwd"
    assert mounts["/etc/group"]["subPath"] == "group"
    assert mounts["/etc/nsswitch.conf"]["subPath"] == "nsswitch.conf"
    assert mounts["/etc/ssl/certs/ca-certificates.crt"]["subPath"] == "ca-certificates.crt"
    assert mounts["/var/lib/web"]["name"] == "data"
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["SSL_CERT_FILE"] == "/etc/ssl/certs/ca-certificates.crt"

    etc = kubectl.get("configmap", "niphas-etc")
    assert etc is not None
    assert etc["data"]["passwd"] == PASSWD
    assert "hosts: files dns" in etc["data"]["nsswitch.conf"]
    assert etc["data"]["ca-certificates.crt"] == CA

    # No spec.service: the ingress's port becomes the Service, and the Ingress routes the
    # host to it.
    service = kubectl.get("service", "web")
    assert service is not None
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(8080, 8080)]
    ingress = kubectl.get("ingress", "web")
    assert ingress is not None
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "web.example.com"
    (path,) = rule["http"]["paths"]
    assert (path["path"], path["pathType"]) == ("/", "Prefix")
    assert path["backend"]["service"] == {"name": "web", "port": {"number": 8080}}
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["metadata"]["ownerReferences"][0]["name"] == "web"

    # This server (1.20) does not keep unhealthyPodEvictionPolicy: the PDB goes without it.
    pdb = kubectl.get("pdb", "web")
    assert pdb is not None
    assert pdb["spec"]["maxUnavailable"] == 1
    assert "unhealthyPodEvictionPolicy" not in pdb["spec"]

    # A workload of the earlier fields only: one replica, no spread, no PDB, no Service, the
    # same defaults in its pods.
    plain = _pod(kubectl, "plain")
    assert "topologySpreadConstraints" not in plain
    assert {t["key"] for t in plain["tolerations"]} == {
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/unreachable",
    }
    assert plain["nodeSelector"] == {"niphas.io/store": "true"}
    assert kubectl.get("pdb", "plain") is None
    assert kubectl.get("service", "plain") is None
    assert (kubectl.get("nw", "plain") or {})["status"]["phase"] == "Provisioning"


async def test_the_unhealthy_pod_eviction_policy_is_detected(crd: KubeApiServer) -> None:
    kube = await connect(crd.kubeconfig, "test")
    assert kube is not None
    async with kube:
        # A dry run: the answer is what the server would keep (1.20 drops the field), and
        # nothing is stored.
        assert await keeps_unhealthy_policy(kube, "policy/v1beta1", "default") is False
        items, _ = await kube.list("/apis/policy/v1beta1/namespaces/default/poddisruptionbudgets")
        assert not [p for p in items if p["metadata"]["name"].startswith("niphas-probe-")]


def test_where_kept_the_pdb_lets_unhealthy_pods_be_evicted() -> None:
    """The manifest for a cluster that keeps the field (this server cannot show it)."""
    obj = {"metadata": {"name": "web", "namespace": "apps", "uid": "u"}, "spec": {}}
    spec = {"flakeRef": "github:a/b", "attribute": "web", "replicas": 2}
    two = Workload({**obj, "spec": spec})
    pdb = disruption_budget(two, "policy/v1", unhealthy_always_allow=True)
    assert pdb is not None
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert (
        disruption_budget(Workload({**obj, "spec": {**spec, "replicas": 1}}), "policy/v1") is None
    )


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (
            {"service": {"ports": [{"port": 80}]}, "ingress": {"host": "a.b", "port": 81}},
            "spec.ingress.port: 81 is not a port of spec.service (80)",
        ),
        ({"extraVolumes": [{"name": "niphas-tmp", "emptyDir": {}}]}, "spec.extraVolumes[0].name"),
        (
            {
                "extraVolumes": [{"name": "data", "emptyDir": {}}],
                "extraVolumeMounts": [{"name": "data", "mountPath": "/nix/store"}],
            },
            "spec.extraVolumeMounts[0].mountPath",
        ),
        (
            {"extraVolumeMounts": [{"name": "ghost", "mountPath": "/data"}]},
            "spec.extraVolumeMounts[0].name: 'ghost' names no volume",
        ),
    ],
)
async def test_a_spec_invalid_across_fields_fails_naming_the_field(
    kubectl: Kubectl,
    operator_settings: OperatorSettings,
    running_operator: OperatorRunner,
    spec: dict[str, Any],
    field: str,
) -> None:
    kubectl.apply(workload("bad", storePath=store_path("bad-1.0"), **spec))
    async with running_operator(operator_settings):

        def failed() -> bool:
            phase = (kubectl.get("nw", "bad") or {}).get("status", {}).get("phase")
            return bool(phase == "Failed")

        await eventually(failed, 30)
    status = (kubectl.get("nw", "bad") or {})["status"]
    assert status["reason"] == "InvalidSpec"
    assert field in status["message"]
    assert kubectl.get("deployment", "bad") is None
