"""Response compression of `niphas_common.kube.client.Kube` against the real kube-apiserver,
which gzips responses over 128 KiB for a client that accepts it: `compressed=False` (the
operator's default, NIPHAS_OPERATOR_API_COMPRESSION) asks for them as they are."""

from __future__ import annotations

import pytest

from niphas_common.kube.client import Kube
from tests.kube_harness import KubeApiServer

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("compressed", "encoding"), [(True, "gzip"), (False, None)])
async def test_large_responses_come_compressed_only_when_asked(
    kube_apiserver: KubeApiServer, kube_namespace: str, compressed: bool, encoding: str | None
) -> None:
    big = "x" * 200_000  # over the server's 128 KiB threshold
    async with Kube(kube_apiserver.api_client(), "test", compressed=compressed) as kube:
        stored = await kube.apply(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": f"big-{compressed}".lower(), "namespace": kube_namespace},
                "data": {"big": big},
            }
        )
        assert stored["data"]["big"] == big
        response = kube.api.last_response  # type: ignore[attr-defined]  # set per call
        assert response.getheader("Content-Encoding") == encoding
