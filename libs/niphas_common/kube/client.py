"""The Kubernetes API as raw JSON objects over kubernetes_asyncio's transport (auth, TLS,
kubeconfig), no generated model classes.

Objects stay plain dicts end to end: server-side apply sends exactly the manifest its caller
built, and nothing is lost converting to and from generated models. API errors are translated
here, once: 404 -> NotFound (or None from `get`), 409 -> KubeConflict, 410 -> Gone, 422 ->
Invalid, anything else (5xx, throttling, a dropped connection) -> KubeError, which is a
TransientError: worth retrying.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any

import aiohttp
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException

from niphas_common.errors import TransientError

RequestCounter = Callable[[str], None]
"""Told the verb of every request (`get`, `patch`, ..., `watch`): a service's metric."""

_JSON = "application/json"
_MERGE = "application/merge-patch+json"
_APPLY = "application/apply-patch+yaml"
_OBJECT_RESPONSE = {200: "object", 201: "object", 202: "object"}
_TEXT_RESPONSE = {200: "str"}
_TRANSPORT_ERRORS = (OSError, aiohttp.ClientError)
"""Connection refused or reset, TLS, timeouts (TimeoutError is an OSError)."""


class KubeError(TransientError):
    """An API request failed in a way worth retrying (5xx, connection, throttling)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class NotFound(KubeError):
    pass


class Forbidden(KubeError):
    """403: our identity may not do this here (RBAC, a quota, a terminating namespace);
    worth retrying slowly, since permissions can be granted."""

    @property
    def reason(self) -> str:
        """The API server's own sentence (the `message` of its Status), else the body."""
        body = str(self).partition(": ")[2]
        try:
            message = json.loads(body).get("message")
        except (ValueError, AttributeError):
            return body
        return str(message or body)


class KubeConflict(KubeError):
    """409: the resourceVersion a write carried is stale, or the object already exists."""


class Gone(KubeError):
    """410: the watch's resourceVersion was compacted away; relist."""


class Invalid(KubeError):
    """422: the server rejected the object; retrying the same object cannot help."""


def _translate(exc: ApiException) -> KubeError:
    status = int(exc.status or 0)
    message = str(exc.body or exc.reason)[:500]
    kind: type[KubeError] = {
        403: Forbidden,
        404: NotFound,
        409: KubeConflict,
        410: Gone,
        422: Invalid,
    }.get(status, KubeError)
    return kind(status, message)


_PLURALS = {
    "Deployment": "deployments",
    "Service": "services",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "Pod": "pods",
    "Event": "events",
    "Lease": "leases",
    "Job": "jobs",
    "Ingress": "ingresses",
    "ConfigMap": "configmaps",
    "Node": "nodes",
}


def resource_path(
    api_version: str, plural: str, namespace: str | None = None, name: str | None = None
) -> str:
    """`/api/v1/...` for the core group, `/apis/<group>/<version>/...` otherwise; every
    namespace when `namespace` is None."""
    root = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    scope = "" if namespace is None else f"/namespaces/{namespace}"
    tail = "" if name is None else f"/{name}"
    return f"{root}{scope}/{plural}{tail}"


def collection_path(api_version: str, kind: str, namespace: str | None = None) -> str:
    return resource_path(api_version, _PLURALS[kind], namespace)


def object_path(api_version: str, kind: str, namespace: str, name: str) -> str:
    return resource_path(api_version, _PLURALS[kind], namespace, name)


def _selectors(label_selector: str | None, field_selector: str | None) -> dict[str, str]:
    query = {}
    if label_selector:
        query["labelSelector"] = label_selector
    if field_selector:
        query["fieldSelector"] = field_selector
    return query


class Kube:
    """A thin client over one ApiClient, which it owns (`close`, or `async with`)."""

    def __init__(
        self,
        api: ApiClient,
        field_manager: str,
        *,
        count: RequestCounter | None = None,
        compressed: bool = True,
    ) -> None:
        """`compressed=False` asks for uncompressed responses (`Accept-Encoding: identity`,
        client-go's DisableCompression): gzip of a large object (a CA bundle of a few hundred
        kilobytes) costs the API server more CPU than the bytes cost a cluster's network."""
        self.api = api
        self.field_manager = field_manager
        self._count = count or (lambda verb: None)
        self._encoding = {} if compressed else {"Accept-Encoding": "identity"}

    async def __aenter__(self) -> Kube:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self.api.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str] | None = None,
        body: Any = None,
        content_type: str = _JSON,
    ) -> dict[str, Any]:
        headers = {"Accept": _JSON, "Content-Type": content_type, **self._encoding}
        result = await self._call(method, path, query, body, headers, _OBJECT_RESPONSE)
        return result if isinstance(result, dict) else {}

    async def text(self, path: str, *, query: dict[str, str] | None = None) -> str:
        """A plain-text resource, such as a pod's log."""
        headers = {"Accept": "*/*", **self._encoding}
        return str(await self._call("GET", path, query, None, headers, _TEXT_RESPONSE))

    async def _call(
        self,
        method: str,
        path: str,
        query: dict[str, str] | None,
        body: Any,
        headers: dict[str, str],
        response_types: dict[int, str],
    ) -> Any:
        self._count(method.lower())
        try:
            return await self.api.call_api(
                path,
                method,
                query_params=list((query or {}).items()),
                header_params=headers,
                body=body,
                response_types_map=response_types,
                auth_settings=["BearerToken"],
                _return_http_data_only=True,
            )
        except ApiException as exc:
            raise _translate(exc) from None
        except _TRANSPORT_ERRORS as exc:
            raise KubeError(0, f"{method} {path}: {exc!r}") from exc

    async def get(self, path: str) -> dict[str, Any] | None:
        try:
            return await self.request("GET", path)
        except NotFound:
            return None

    async def list(
        self, path: str, *, label_selector: str | None = None, field_selector: str | None = None
    ) -> tuple[list[dict[str, Any]], str]:
        """The items and the list's resourceVersion (where a watch of it starts)."""
        body = await self.request("GET", path, query=_selectors(label_selector, field_selector))
        return list(body.get("items") or []), str(body["metadata"].get("resourceVersion", ""))

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.request("POST", path, body=body)

    async def merge_patch(self, path: str, patch: dict[str, Any]) -> dict[str, Any]:
        return await self.request("PATCH", path, body=patch, content_type=_MERGE)

    async def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply: the server merges only what changed, and an unchanged
        manifest leaves the object (and its resourceVersion) as it is."""
        meta = manifest["metadata"]
        path = object_path(
            manifest["apiVersion"], manifest["kind"], meta["namespace"], meta["name"]
        )
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
        root = "/api/" if "/" not in group_version else "/apis/"
        try:
            await self.request("GET", root + group_version)
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
        field_selector: str | None = None,
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """(type, object) after `resource_version` until the server closes the stream,
        BOOKMARKs included. Raises Gone when that version has been compacted away."""
        query = {
            "watch": "true",
            "resourceVersion": resource_version,
            "timeoutSeconds": str(timeout_s),
            "allowWatchBookmarks": "true",
            **_selectors(label_selector, field_selector),
        }
        self._count("watch")
        try:
            response = await self.api.call_api(
                path,
                "GET",
                query_params=list(query.items()),
                header_params={"Accept": _JSON, **self._encoding},
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=timeout_s + 30,
            )
        except _TRANSPORT_ERRORS as exc:
            raise KubeError(0, f"watch {path}: {exc!r}") from exc
        try:
            if response.status != 200:
                text = (await response.read()).decode(errors="replace")
                raise (Gone if response.status == 410 else KubeError)(response.status, text[:500])
            async for line in response.content:
                if line.strip():
                    yield _watch_event(line)
        except aiohttp.ClientError as exc:
            raise KubeError(0, f"watch {path}: {exc!r}") from exc
        finally:
            response.release()


def _watch_event(line: bytes) -> tuple[str, dict[str, Any]]:
    event = json.loads(line)
    obj = event.get("object") or {}
    if event.get("type") == "ERROR":
        code = int(obj.get("code", 0))
        raise (Gone if code == 410 else KubeError)(code, str(obj.get("message")))
    return str(event.get("type")), obj
