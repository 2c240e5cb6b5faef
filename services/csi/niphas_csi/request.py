"""Validating a NodePublishVolume request into a `PublishRequest`, before anything is touched.

Every refusal is an `InvalidRequest` whose message names the field and the problem: kubelet
shows it in the pod's events, so it has to be enough to fix the manifest.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from pydantic import TypeAdapter, ValidationError

from niphas_common.nix.errors import StorePathError
from niphas_common.nix.store_path import StorePath
from niphas_schemas.events import BinaryCacheUrl, NixPublicKey
from niphas_schemas.types import StorePath as StorePathStr

from .errors import InvalidRequest

STORE_PATH_ATTRIBUTE = "storePath"
"""volumeAttributes key: one or more store paths, separated by commas or whitespace."""
EPHEMERAL_KEY = "csi.storage.k8s.io/ephemeral"
POD_KEYS = {
    "csi.storage.k8s.io/pod.name": "name",
    "csi.storage.k8s.io/pod.namespace": "namespace",
    "csi.storage.k8s.io/pod.uid": "uid",
    "csi.storage.k8s.io/serviceAccount.name": "service_account",
}
TRACEPARENT_ATTRIBUTE = "traceparent"
"""volumeAttributes key (optional): the W3C trace context of the build that moved the workload
(the operator sets it), so the mount and the fetch it causes join the trace of the push."""
CACHE_ATTRIBUTE = "binaryCache"
"""volumeAttributes key (optional): a binary cache URL the workload names for its closure (the
operator sets it from spec.binaryCache.url); passed to the mesh in the want, which uses it only
if the node's NIPHAS_MESH_WORKLOAD_CACHES allows it."""
CACHE_KEY_ATTRIBUTE = "binaryCachePublicKey"
"""volumeAttributes key (optional, with `binaryCache`): the key that cache signs with
(name:base64); the mesh refuses it unless the node already trusts it."""
MAX_STORE_PATHS = 1024
"""As many as one path.wanted event may carry."""

_VOLUME_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")
_STORE_PATH = TypeAdapter(StorePathStr)


@dataclass(frozen=True, slots=True)
class PublishRequest:
    volume_id: str
    target: str
    store_paths: tuple[str, ...]
    """The requested paths (logical, sorted, unique); the volume is their closure."""
    pod: Mapping[str, str] = field(default_factory=dict)
    """name, namespace, uid of the pod (podInfoOnMount), for logs and the state record."""
    traceparent: str | None = None
    binary_cache: str | None = None
    """The workload's binary cache (the `binaryCache` attribute), for the mesh to consider."""
    binary_cache_public_key: str | None = None


def validate_volume_id(volume_id: str) -> str:
    # It names the lease directory and the state file: only a plain file name will do.
    if not volume_id:
        raise InvalidRequest("volume_id is required")
    if not _VOLUME_ID_RE.match(volume_id):
        raise InvalidRequest(
            f"volume_id {volume_id!r} must be 1-128 letters, digits, '.', '_' or '-'"
        )
    return volume_id


def validate_target(target: str, allowed_root: str | os.PathLike[str]) -> str:
    if not target:
        raise InvalidRequest("target_path is required")
    path = PurePosixPath(target)
    if not path.is_absolute():
        raise InvalidRequest(f"target_path {target!r} is not an absolute path")
    if ".." in path.parts or os.path.normpath(target) != target.rstrip("/"):
        raise InvalidRequest(f"target_path {target!r} is not a normalised path")
    root = os.path.realpath(allowed_root)
    # Resolve the parent (kubelet creates it) so a symlink cannot lead the mount elsewhere.
    resolved = os.path.join(os.path.realpath(os.path.dirname(target.rstrip("/"))), path.name)
    if os.path.commonpath([root, resolved]) != root or resolved == root:
        raise InvalidRequest(f"target_path {target!r} is outside the allowed root {root}")
    return resolved


def parse_store_paths(value: str | None) -> tuple[str, ...]:
    if value is None or not value.strip():
        raise InvalidRequest(f"volume attribute {STORE_PATH_ATTRIBUTE!r} is required")
    items = [item for item in re.split(r"[\s,]+", value) if item]
    if len(items) > MAX_STORE_PATHS:
        raise InvalidRequest(f"{STORE_PATH_ATTRIBUTE!r} has more than {MAX_STORE_PATHS} paths")
    paths: set[str] = set()
    for item in items:
        try:
            _STORE_PATH.validate_python(item)
            paths.add(str(StorePath.parse(item)))
        except (ValidationError, StorePathError) as exc:
            detail = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
            raise InvalidRequest(
                f"volume attribute {STORE_PATH_ATTRIBUTE!r}: {item!r} is not a store path "
                f"({detail})"
            ) from None
    return tuple(sorted(paths))


_CACHE_URL = TypeAdapter(BinaryCacheUrl)
_CACHE_KEY = TypeAdapter(NixPublicKey)


def parse_binary_cache(volume_context: Mapping[str, str]) -> tuple[str | None, str | None]:
    """The `binaryCache` and `binaryCachePublicKey` attributes, checked as the want checks
    them: an http(s) URL (no query, user info, dot segments or escapes); a Nix public key
    (name:base64), only together with a cache."""
    url = volume_context.get(CACHE_ATTRIBUTE) or None
    key = volume_context.get(CACHE_KEY_ATTRIBUTE) or None
    checks = ((CACHE_ATTRIBUTE, url, _CACHE_URL, "an http(s):// URL"),
              (CACHE_KEY_ATTRIBUTE, key, _CACHE_KEY, "a Nix public key name:base64"))  # fmt: skip
    for attribute, value, adapter, form in checks:
        if value is None:
            continue
        try:
            adapter.validate_python(value)
        except ValidationError as exc:
            detail = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise InvalidRequest(
                f"volume attribute {attribute!r}: {value!r} is not {form} ({detail})"
            ) from None
    if key is not None and url is None:
        raise InvalidRequest(
            f"volume attribute {CACHE_KEY_ATTRIBUTE!r} is set without {CACHE_ATTRIBUTE!r}"
        )
    return url, key


def validate_publish(
    *,
    volume_id: str,
    target_path: str,
    volume_context: Mapping[str, str],
    has_mount_capability: bool,
    has_block_capability: bool,
    staging_target_path: str,
    allowed_root: str | os.PathLike[str],
) -> PublishRequest:
    validate_volume_id(volume_id)
    target = validate_target(target_path, allowed_root)
    if has_block_capability:
        raise InvalidRequest("volume_capability: block access is not supported, only mount")
    if not has_mount_capability:
        raise InvalidRequest("volume_capability with mount access is required")
    if staging_target_path:
        raise InvalidRequest("staging_target_path is set, but this driver has no staging step")
    store_paths = parse_store_paths(volume_context.get(STORE_PATH_ATTRIBUTE))
    pod = {short: volume_context[key] for key, short in POD_KEYS.items() if key in volume_context}
    traceparent = volume_context.get(TRACEPARENT_ATTRIBUTE) or None
    cache, cache_key = parse_binary_cache(volume_context)
    return PublishRequest(volume_id, target, store_paths, pod, traceparent, cache, cache_key)
