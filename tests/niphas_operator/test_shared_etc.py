"""The pods' minimal /etc is one ConfigMap per namespace, on a real kube-apiserver: the
workloads of a namespace share it (its content is what their pods mount), a new CA bundle
rolls all of them, it stays while a workload remains and goes with the last one (and comes
back for the next), a workload created while the last one is being deleted still gets it,
and an upgraded operator deletes the per-workload ConfigMap of the earlier layout."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from niphas_common.kube.config import connect
from niphas_common.kube.watch import Backoff
from niphas_operator.children import (
    ETC_DIGEST_ANNOTATION,
    ETC_NAME,
    ETC_VOLUME,
    PodSettings,
    etc_data,
)
from niphas_operator.kubernetes_store import KubernetesStore
from niphas_operator.reconciler import Reconciler
from niphas_operator.settings import OperatorSettings
from niphas_schemas import Event
from tests.helpers import eventually
from tests.kube_harness import KubeApiServer
from tests.niphas_operator.conftest import Kubectl, OperatorRunner, store_path, workload

pytestmark = pytest.mark.slow

CA_ONE = "-----BEGIN CERTIFICATE-----\nMIIBone\n-----END CERTIFICATE-----\n"
CA_TWO = "-----BEGIN CERTIFICATE-----\nMIIBtwo\n-----END CERTIFICATE-----\n"


def _etc_of(kubectl: Kubectl, name: str) -> tuple[str, str | None]:
    """The ConfigMap a workload's pods mount as /etc, and the digest its pods carry."""
    deployment = kubectl.get("deployment", name)
    assert deployment is not None
    template = deployment["spec"]["template"]
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    digest = template["metadata"]["annotations"].get(ETC_DIGEST_ANNOTATION)
    return volumes[ETC_VOLUME]["configMap"]["name"], digest


def _operators_config_maps(kubectl: Kubectl) -> list[dict[str, Any]]:
    listing = json.loads(
        kubectl("get", "configmaps", "-l", "app.kubernetes.io/managed-by=niphas-operator",
                "-o", "json")
    )  # fmt: skip
    items: list[dict[str, Any]] = listing["items"]
    return items


async def test_a_namespace_s_workloads_share_one_etc_until_the_last_is_deleted(
    kubectl: Kubectl,
    operator_settings: OperatorSettings,
    running_operator: OperatorRunner,
    tmp_path: Path,
) -> None:
    bundle = tmp_path / "ca.crt"
    bundle.write_text(CA_ONE)
    settings = operator_settings.model_copy(update={"ca_bundle_file": bundle})
    for name in ("web", "api"):
        kubectl.apply(workload(name, storePath=store_path(f"{name}-1.0")))
    async with running_operator(settings):
        await eventually(
            lambda: all(kubectl.get("deployment", n) is not None for n in ("web", "api")), 30
        )
    (etc,) = _operators_config_maps(kubectl)
    assert etc["metadata"]["name"] == ETC_NAME
    assert etc["data"] == etc_data(settings.pod())
    assert etc["data"]["ca-certificates.crt"] == CA_ONE
    assert "ownerReferences" not in etc["metadata"]
    mounted = {n: _etc_of(kubectl, n) for n in ("web", "api")}
    assert mounted["web"] == mounted["api"]
    assert mounted["web"][0] == ETC_NAME
    first_digest = mounted["web"][1]
    assert first_digest == etc["metadata"]["annotations"][ETC_DIGEST_ANNOTATION]

    # A new CA bundle: the one ConfigMap changes, and both workloads' pods roll.
    bundle.write_text(CA_TWO)
    async with running_operator(settings):

        def rolled() -> bool:
            return all(_etc_of(kubectl, n)[1] not in (None, first_digest) for n in ("web", "api"))

        await eventually(rolled, 30)
        etc = kubectl.get("configmap", ETC_NAME) or {}
        assert etc["data"]["ca-certificates.crt"] == CA_TWO
        assert _etc_of(kubectl, "web") == _etc_of(kubectl, "api")
        assert etc["metadata"]["annotations"][ETC_DIGEST_ANNOTATION] == _etc_of(kubectl, "web")[1]

        # Deleting one workload keeps what the other's pods mount.
        kubectl("delete", "nw", "web", "--wait=false")
        await eventually(lambda: kubectl.get("nw", "web") is None, 30)
        assert kubectl.get("deployment", "web") is None
        assert kubectl.get("configmap", ETC_NAME) is not None

        # The last one takes it along: nothing of the operator's is left in the namespace.
        kubectl("delete", "nw", "api", "--wait=false")
        await eventually(lambda: kubectl.get("nw", "api") is None, 30)
        assert kubectl.get("configmap", ETC_NAME) is None
        assert _operators_config_maps(kubectl) == []

        # The same operator applies it again for a workload created afterwards.
        kubectl.apply(workload("late", storePath=store_path("late-1.0")))
        await eventually(lambda: kubectl.get("deployment", "late") is not None, 30)
        etc = kubectl.get("configmap", ETC_NAME) or {}
        assert etc["data"]["ca-certificates.crt"] == CA_TWO


async def test_an_upgraded_operator_deletes_the_per_workload_etc(
    kubectl: Kubectl, operator_settings: OperatorSettings, running_operator: OperatorRunner
) -> None:
    """A workload an earlier operator ran (it has an observedGeneration) loses its own
    `<name>-niphas-etc`; a ConfigMap of the user's named like the workload is never touched,
    not even when the workload is deleted."""
    kubectl.apply(workload("old", storePath=store_path("old-1.0")))
    owner = kubectl.get("nw", "old") or {}
    kubectl(
        "patch", "nw", "old", "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"observedGeneration": 1, "phase": "Provisioning"}}),
    )  # fmt: skip
    reference = {"apiVersion": "niphas.io/v1alpha1", "kind": "NiphasWorkload", "name": "old",
                 "uid": owner["metadata"]["uid"], "controller": True}  # fmt: skip
    for name, references in (("old-niphas-etc", [reference]), ("old", [])):
        config_map = {"apiVersion": "v1", "kind": "ConfigMap", "data": {"passwd": "x"},
                      "metadata": {"name": name, "ownerReferences": references}}  # fmt: skip
        kubectl.apply(config_map)
    async with running_operator(operator_settings):
        await eventually(lambda: kubectl.get("configmap", "old-niphas-etc") is None, 30)
        assert _etc_of(kubectl, "old")[0] == ETC_NAME
        kubectl("delete", "nw", "old", "--wait=false")
        await eventually(lambda: kubectl.get("nw", "old") is None, 30)
    assert kubectl.get("configmap", ETC_NAME) is None
    assert (kubectl.get("configmap", "old") or {}).get("data") == {"passwd": "x"}


class PausingStore(KubernetesStore):
    """The API server's store, held right after it answered whether workloads remain: the
    moment between a clean-up's decision and its delete."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.decided = asyncio.Event()
        self.proceed = asyncio.Event()

    async def workloads_remain(self, namespace: str, besides: str) -> bool:
        remain = await super().workloads_remain(namespace, besides)
        self.decided.set()
        await self.proceed.wait()
        return remain


async def test_a_workload_created_while_the_last_is_deleted_keeps_its_etc(
    kubectl: Kubectl, crd: KubeApiServer, kube_namespace: str
) -> None:
    kube = await connect(crd.kubeconfig, "niphas-operator")
    assert kube is not None
    pod = PodSettings("stub", "csi.niphas.io", ("niphas.io/store", "true"), ca_bundle=CA_ONE)
    published: list[Event] = []

    async def publish(event: Event) -> None:
        published.append(event)

    async with kube:
        store = PausingStore(
            kube,
            namespace=kube_namespace,
            pdb_api_version="policy/v1beta1",
            resync_s=300,
            retry=Backoff(0.1, 1),
        )
        reconciler = Reconciler(store, publish, pod, preheat_nodes=(), preheat_deadline_s=60)
        kubectl.apply(workload("first", storePath=store_path("first-1.0")))
        await reconciler.reconcile(kube_namespace, "first")
        assert kubectl.get("configmap", ETC_NAME) is not None

        kubectl("delete", "nw", "first", "--wait=false")
        cleaning = asyncio.create_task(reconciler.reconcile(kube_namespace, "first"))
        await store.decided.wait()  # "first" was the last one: the ConfigMap is to go
        kubectl.apply(workload("second", storePath=store_path("second-1.0")))
        second = asyncio.create_task(reconciler.reconcile(kube_namespace, "second"))
        # A reconcile trusting the memo of the ConfigMap would finish here, before the delete.
        await asyncio.sleep(0.5)
        store.proceed.set()
        await asyncio.gather(cleaning, second)

        assert kubectl.get("nw", "first") is None
        assert kubectl.get("deployment", "second") is not None
        etc = kubectl.get("configmap", ETC_NAME)
        assert etc is not None
        assert etc["data"]["ca-certificates.crt"] == CA_ONE


async def test_a_relist_applies_a_deleted_etc_again(
    kubectl: Kubectl, operator_settings: OperatorSettings, running_operator: OperatorRunner
) -> None:
    """The memo of what was applied lasts until the next full list, not for the process."""
    settings = operator_settings.model_copy(update={"resync_s": 1.0})
    kubectl.apply(workload("web", storePath=store_path("web-1.0")))
    async with running_operator(settings):
        await eventually(lambda: kubectl.get("configmap", ETC_NAME) is not None, 30)
        kubectl("delete", "configmap", ETC_NAME)
        await eventually(lambda: kubectl.get("configmap", ETC_NAME) is not None, 30)
