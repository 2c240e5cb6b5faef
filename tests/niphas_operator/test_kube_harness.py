"""The kube_apiserver fixture: a real kube-apiserver with etcd answers kubernetes_asyncio
(bearer token, its own CA) and kubectl (the generated kubeconfig)."""

from __future__ import annotations

import json

import pytest
from kubernetes_asyncio.client import CoreV1Api, V1ConfigMap, V1ObjectMeta

from tests.kube_harness import KubeApiServer

pytestmark = pytest.mark.slow


async def test_configmap_round_trip(kube_apiserver: KubeApiServer, kube_namespace: str) -> None:
    async with kube_apiserver.api_client() as client:
        core = CoreV1Api(client)
        created = await core.create_namespaced_config_map(
            kube_namespace,
            V1ConfigMap(metadata=V1ObjectMeta(name="probe"), data={"closure": "/nix/store/x"}),
        )
        read = await core.read_namespaced_config_map("probe", kube_namespace)
    assert read.data == {"closure": "/nix/store/x"}
    assert read.metadata.resource_version == created.metadata.resource_version
    out = kube_apiserver.kubectl("-n", kube_namespace, "get", "configmap", "probe", "-o", "json")
    assert json.loads(out.stdout)["data"]["closure"] == "/nix/store/x"
