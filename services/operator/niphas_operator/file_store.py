"""Workloads without a cluster: NiphasWorkload YAML files in, manifests out for GitOps.

- `workloads_dir/*.yaml`: the workloads, the user's files (never written here). A document
  without a namespace is in `default`.
- `status_dir/<namespace>/<name>.json`: what the API server would keep beside each one: its
  status, finalizers, generation, resourceVersion, and the `spec.storePath` a rollback pins
  (an overlay on the user's spec). Changing the effective spec (the file, or a pin) bumps
  the generation, as the API server does.
- `render_dir/<namespace>/<child>/{deployment,service,ingress,pdb,configmap}.yaml`: the
  children by their names (`<name>`; `<name>-<arch>` for each architecture's Deployment;
  `niphas-etc` for the pods' /etc, one per namespace), exactly what
  the Kubernetes store applies minus owner references (no uid exists before a cluster holds
  the object), for Fleet or Argo CD to deliver. Written only when their content changes, so
  a GitOps repository sees no churn.

Writers in several processes (the operator, `niphas rollback`) read-modify-write under one
lock file (`status_dir/.lock`), and each write that carries the resourceVersion it read is
refused with `KubeConflict` when another writer came first; files are replaced atomically,
so readers never see half a file. Changes are found by polling every `poll_s` (a full relist
every `resync_s`); no cluster runs the Deployments, so none report readiness.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import fcntl
import hashlib
import json
import logging
import time
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import yaml

from niphas_common.kube.client import KubeConflict, NotFound
from niphas_common.kube.watch import LISTED, SYNCED, WatchEvent
from niphas_operator.settings import OperatorSettings
from niphas_operator.store import Key
from niphas_operator.workload import KIND, Workload

log = logging.getLogger(__name__)

# libyaml's loader and dumper where PyYAML has them (same documents, same text): the pure
# Python ones took milliseconds per workload file and rendered Deployment, read several
# times per build.done, and half a second for a ConfigMap holding a CA bundle.
_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DUMPER: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)

RACY_NS = 1_000_000_000
"""A workload file modified this recently (ns) is never taken from the parse cache."""

FILENAMES = {
    "Deployment": "deployment.yaml",
    "Service": "service.yaml",
    "PodDisruptionBudget": "pdb.yaml",
    "Ingress": "ingress.yaml",
    "ConfigMap": "configmap.yaml",
}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge, None removes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def write_if_changed(path: Path, text: str) -> bool:
    if path.exists() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return True


class FileStore:
    pdb_api_version = "policy/v1"
    pdb_unhealthy_policy = False
    """The cluster that will get the manifests is unknown: a field older servers would
    refuse at client-side validation is left out."""

    def __init__(
        self,
        workloads_dir: Path,
        render_dir: Path,
        status_dir: Path,
        *,
        poll_s: float = 1.0,
        resync_s: float = 300.0,
    ) -> None:
        self.workloads_dir = workloads_dir
        self.render_dir = render_dir
        self.status_dir = status_dir
        self._poll_s = poll_s
        self._resync_s = resync_s
        self._parsed: dict[Path, tuple[tuple[int, int, int], tuple[Any, ...]]] = {}
        """Each workload file's documents, by (inode, mtime, size) when parsed: every read
        of a workload lists the directory, and most files have not changed since."""

    @classmethod
    def from_settings(cls, settings: OperatorSettings) -> FileStore:
        return cls(
            settings.resolved_workloads_dir(),
            settings.resolved_render_dir(),
            settings.resolved_status_dir(),
            resync_s=settings.resync_s,
        )

    # -- workloads ---------------------------------------------------------------------------

    async def get(self, key: Key) -> dict[str, Any] | None:
        source = self._sources().get(key)
        return None if source is None else self._view(source, self._record(key))

    async def list(self) -> list[dict[str, Any]]:
        return list(self._objects().values())

    async def merge_patch(self, key: Key, patch: dict[str, Any]) -> dict[str, Any]:
        return self._write(key, patch, status=False)

    async def merge_patch_status(self, key: Key, patch: dict[str, Any]) -> dict[str, Any]:
        return self._write(key, patch, status=True)

    def _objects(self) -> dict[Key, dict[str, Any]]:
        return {key: self._view(doc, self._record(key)) for key, doc in self._sources().items()}

    def _sources(self) -> dict[Key, dict[str, Any]]:
        found: dict[Key, dict[str, Any]] = {}
        for path in sorted(self.workloads_dir.glob("*.y*ml")):
            try:
                docs = self._documents(path)
            except (OSError, yaml.YAMLError) as exc:
                log.warning("skipping %s: %s", path, exc)
                continue
            for doc in docs:
                if isinstance(doc, dict) and doc.get("kind") == KIND:
                    meta = doc.setdefault("metadata", {})
                    meta.setdefault("namespace", "default")
                    found[(meta["namespace"], meta["name"])] = doc
        return found

    def _documents(self, path: Path) -> tuple[Any, ...]:
        """The YAML documents of `path`, a copy the caller may change."""
        stat = path.stat()
        signature = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        cached = self._parsed.get(path)
        # A file changed within the last second is parsed again, as git treats a racily
        # clean file: a second edit of the same size can keep the coarse mtime of the first.
        racy = time.time_ns() - stat.st_mtime_ns < RACY_NS
        if cached is None or cached[0] != signature or racy:
            cached = signature, tuple(yaml.load_all(path.read_text(), Loader=_LOADER))
            self._parsed[path] = cached
        return copy.deepcopy(cached[1])

    def _record_path(self, key: Key) -> Path:
        namespace, name = key
        return self.status_dir / namespace / f"{name}.json"

    def _record(self, key: Key) -> dict[str, Any]:
        path = self._record_path(key)
        if not path.exists():
            return {}
        loaded = json.loads(path.read_text())
        return loaded if isinstance(loaded, dict) else {}

    def _view(self, source: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
        """The workload as the API server would hold it: the file's spec with the pinned
        overlay, and the metadata and status kept in its record."""
        spec = merge_patch(source.get("spec") or {}, record.get("spec") or {})
        digest = _digest(spec)
        generation = int(record.get("generation", 0))
        if record.get("specDigest") != digest:
            generation += 1  # the spec changed since the record was written
        meta = {
            **source["metadata"],
            "uid": "",
            "generation": generation,
            "resourceVersion": f"{record.get('writes', 0)}-{digest}",
            "finalizers": list(record.get("finalizers") or []),
        }
        return {**source, "metadata": meta, "spec": spec, "status": record.get("status") or {}}

    def _write(self, key: Key, patch: dict[str, Any], *, status: bool) -> dict[str, Any]:
        with self._locked():
            source = self._sources().get(key)
            if source is None:
                raise NotFound(404, f"no NiphasWorkload {key[0]}/{key[1]} in {self.workloads_dir}")
            record = self._record(key)
            current = self._view(source, record)
            meta = patch.get("metadata") or {}
            expected = meta.get("resourceVersion")
            if expected is not None and expected != current["metadata"]["resourceVersion"]:
                raise KubeConflict(409, f"{key[0]}/{key[1]} changed since {expected}")
            record = {
                **record,
                "generation": current["metadata"]["generation"],
                "specDigest": _digest(current["spec"]),
                "writes": int(record.get("writes", 0)) + 1,
            }
            if status:
                record["status"] = merge_patch(record.get("status") or {}, patch.get("status"))
            else:
                if "finalizers" in meta:
                    record["finalizers"] = list(meta["finalizers"] or [])
                record["spec"] = merge_patch(record.get("spec") or {}, patch.get("spec") or {})
            written = self._view(source, record)
            record["generation"] = written["metadata"]["generation"]
            record["specDigest"] = _digest(written["spec"])
            write_if_changed(self._record_path(key), json.dumps(record, indent=1, sort_keys=True))
            return self._view(source, record)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.status_dir.mkdir(parents=True, exist_ok=True)
        with (self.status_dir / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # -- children ----------------------------------------------------------------------------

    def _child_path(self, kind: str, key: Key) -> Path:
        namespace, name = key
        return self.render_dir / namespace / name / FILENAMES[kind]

    async def child(self, api_version: str, kind: str, key: Key) -> dict[str, Any] | None:
        path = self._child_path(kind, key)
        if not path.exists():
            return None
        loaded = yaml.load(path.read_text(), Loader=_LOADER)
        return loaded if isinstance(loaded, dict) else None

    async def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        meta = {k: v for k, v in manifest["metadata"].items() if k != "ownerReferences"}
        rendered = {**manifest, "metadata": meta}
        text = yaml.dump(rendered, Dumper=_DUMPER, sort_keys=False)
        write_if_changed(
            self._child_path(manifest["kind"], (meta["namespace"], meta["name"])), text
        )
        return {**rendered, "metadata": {**meta, "resourceVersion": _digest(text)}}

    async def delete(self, api_version: str, kind: str, key: Key) -> None:
        path = self._child_path(kind, key)
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            path.parent.rmdir()  # the child's directory, once nothing else is in it

    async def workloads_remain(self, namespace: str, besides: str) -> bool:
        return any(ns == namespace and name != besides for ns, name in self._sources())

    async def nodes_running(self, workload: Workload) -> tuple[str, ...]:
        return ()

    async def nodes_labelled(self, labels: dict[str, str]) -> tuple[str, ...] | None:
        return None

    async def record(
        self, workload: Workload, reason: str, message: str, *, about: str, warning: bool = False
    ) -> None:
        log.info("%s/%s %s: %s", workload.namespace, workload.name, reason, message)

    # -- changes -----------------------------------------------------------------------------

    async def workload_events(self) -> AsyncGenerator[WatchEvent]:
        seen: dict[Key, dict[str, Any]] = {}
        listed = float("-inf")
        while True:
            objects = self._objects()
            if time.monotonic() - listed >= self._resync_s:
                for obj in objects.values():
                    yield WatchEvent(LISTED, obj)
                yield WatchEvent(SYNCED)
                listed = time.monotonic()
            else:
                for event in _changes(seen, objects):
                    yield event
            seen = objects
            await asyncio.sleep(self._poll_s)

    async def child_events(self) -> AsyncGenerator[WatchEvent]:
        """Nothing, not even a list: no cluster runs the Deployments, and the reconciler reads
        a rendered one (`child`) whenever it needs to know what it runs."""
        await asyncio.Event().wait()
        yield WatchEvent(SYNCED)  # never reached: makes this an async generator


def _changes(
    before: dict[Key, dict[str, Any]], after: dict[Key, dict[str, Any]]
) -> Iterator[WatchEvent]:
    for key, obj in after.items():
        old = before.get(key)
        if old is None:
            yield WatchEvent("ADDED", obj)
        elif old["metadata"]["resourceVersion"] != obj["metadata"]["resourceVersion"]:
            yield WatchEvent("MODIFIED", obj)
    for key in before.keys() - after.keys():
        yield WatchEvent("DELETED", before[key])
