"""The Kubernetes API as the operator uses it: raw JSON objects over kubernetes_asyncio's
transport (auth, TLS, kubeconfig), no model classes.

Objects stay plain dicts end to end: server-side apply sends exactly the manifest the
children module built, and nothing is lost converting to and from generated models. Every
request is counted in `niphas_operator_api_requests_total` (the benchmark's figure).
API errors are translated here, once: 404 -> None or NotFound, 409 -> Conflict, 410 -> Gone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException
from prometheus_client import Counter

from niphas_common.errors import TransientError
from niphas_operator.workload import GROUP, PLURAL, VERSION

log = logging.getLogger(__name__)

API_REQUESTS = Counter(
    "niphas_operator_api_requests_total", "Kubernetes API requests by verb", ["verb"]
)

_JSON = "application/json"
_MERGE = "application/merge-patch+json"
_APPLY = "application/apply-patch+yaml"
_RESPONSE_TYPES = {200: "object", 201: "object", 202: "object"}


class KubeError(TransientError):
    """An API request failed in a way worth retrying (5xx, connection, throttling)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class NotFound(KubeError):
    pass


class Conflict(KubeError):
    pass


class Gone(KubeError):
    """The watch's resourceVersion is too old: relist."""


class Invalid(KubeError):
    """The server rejected the object (422): retrying the same object cannot help."""


def _translate(exc: ApiException) -> KubeError:
    status = int(exc.status or 0)
    message = str(exc.body or exc.reason)[:500]
    kind: type[KubeError] = {404: NotFound, 409: Conflict, 410: Gone, 422: Invalid}.get(
        status, KubeError
    )
    return kind(status, message)


_PATHS = {
    ("apps/v1", "Deployment"): "/apis/apps/v1/namespaces/{ns}/deployments",
    ("v1", "Service"): "/api/v1/namespaces/{ns}/services",
    ("policy/v1", "PodDisruptionBudget"): "/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets",
    (
        "policy/v1beta1",
        "PodDisruptionBudget",
    ): "/apis/policy/v1beta1/namespaces/{ns}/poddisruptionbudgets",
    ("v1", "Pod"): "/api/v1/namespaces/{ns}/pods",
    ("v1", "Event"): "/api/v1/namespaces/{ns}/events",
    ("coordination.k8s.io/v1", "Lease"): "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases",
}


def collection_path(api_version: str, kind: str, namespace: str) -> str:
    return _PATHS[(api_version, kind)].format(ns=namespace)


def workloads_path(namespace: str | None) -> str:
    if namespace is None:
        return f"/apis/{GROUP}/{VERSION}/{PLURAL}"
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}"


def workload_path(namespace: str, name: str) -> str:
    return f"{workloads_path(namespace)}/{name}"


class Kube:
    """A thin client over one ApiClient (the caller owns and closes it)."""

    def __init__(self, api: ApiClient, field_manager: str) -> None:
        self._api = api
        self.field_manager = field_manager

    async def request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
        body: Any = None,
        content_type: str = _JSON,
    ) -> dict[str, Any]:
        API_REQUESTS.labels(method.lower()).inc()
        try:
            result = await self._api.call_api(
                path,
                method,
                query_params=list((query or {}).items()),
                header_params={"Accept": _JSON, "Content-Type": content_type},
                body=body,
                response_types_map=_RESPONSE_TYPES,
                auth_settings=["BearerToken"],
                _return_http_data_only=True,
            )
        except ApiException as exc:
            raise _translate(exc) from None
        except OSError as exc:
            raise KubeError(0, f"{method} {path}: {exc}") from exc
        return result if isinstance(result, dict) else {}

    async def get(self, path: str) -> dict[str, Any] | None:
        try:
            return await self.request("GET", path)
        except NotFound:
            return None

    async def list(
        self, path: str, *, label_selector: str | None = None
    ) -> tuple[list[dict[str, Any]], str]:
        query = {"labelSelector": label_selector} if label_selector else {}
        body = await self.request("GET", path, query=query)
        return list(body.get("items") or []), str(body["metadata"].get("resourceVersion", ""))

    async def merge_patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        return await self.request("PATCH", path, body=patch, content_type=_MERGE)

    async def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply: the server merges only what changed, and an unchanged
        manifest leaves the object (and its resourceVersion) as it is."""
        meta = manifest["metadata"]
        collection = collection_path(manifest["apiVersion"], manifest["kind"], meta["namespace"])
        path = f"{collection}/{meta['name']}"
        return await self.request(
            "PATCH",
            path,
            query={"fieldManager": self.field_manager, "force": "true"},
            body=manifest,
            content_type=_APPLY,
        )

    async def delete(self, path: str) -> bool:
        """Delete (dependents left to the garbage collector); False when already gone."""
        try:
            await self.request("DELETE", path, body={"propagationPolicy": "Background"})
        except NotFound:
            return False
        return True

    async def served(self, group_version: str) -> bool:
        """Whether the server serves an API group version (e.g. policy/v1)."""
        prefix = "/api/" if "/" not in group_version else "/apis/"
        try:
            await self.request("GET", prefix + group_version)
        except NotFound:
            return False
        return True

    async def watch(
        self,
        path: str,
        resource_version: str,
        *,
        timeout_s: int,
        label_selector: str | None = None,
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Events after `resource_version` until the server closes the stream.
        Raises Gone when that version has been compacted away."""
        query = {
            "watch": "true",
            "resourceVersion": resource_version,
            "timeoutSeconds": str(timeout_s),
            "allowWatchBookmarks": "true",
        }
        if label_selector:
            query["labelSelector"] = label_selector
        API_REQUESTS.labels("watch").inc()
        try:
            response = await self._api.call_api(
                path,
                "GET",
                query_params=list(query.items()),
                header_params={"Accept": _JSON},
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=timeout_s + 30,
            )
        except OSError as exc:
            raise KubeError(0, f"watch {path}: {exc}") from exc
        try:
            if response.status != 200:
                text = (await response.read()).decode(errors="replace")
                kind = Gone if response.status == 410 else KubeError
                raise kind(response.status, text[:500])
            async for line in response.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                obj = event.get("object") or {}
                if event.get("type") == "ERROR":
                    code = int(obj.get("code", 0))
                    raise (Gone if code == 410 else KubeError)(code, str(obj.get("message")))
                yield str(event.get("type")), obj
        finally:
            response.release()
