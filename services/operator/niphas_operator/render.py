"""Render mode: no cluster, so write the manifests the operator would apply, for a GitOps tool
(Fleet, Argo CD) to deliver.

Workloads are NiphasWorkload YAML files in `workloads_dir`. Each one gets
`<render_dir>/<namespace>/<name>/{deployment,service,pdb}.yaml`, exactly what cluster mode
applies minus owner references (no uid exists before a cluster holds the object). The store
path comes from `spec.storePath`, else from the latest matching `build.done`, remembered in
`<render_dir>/.niphas-state.json` with when its commit was pushed (a late build of an earlier
push is ignored, as in cluster mode); a workload with neither asks the pipeline with
`push.received` (once: its msg id is deterministic). Files are written only when their
content changes, so a GitOps repository sees no churn.

The state file also keeps each workload's history, a pin (what `niphas rollback` sets when no
cluster is configured: the workload file is the user's and stays untouched) and the
`traceparent` of the build that moved it (carried into the volume attributes, so the mount
joins the push's trace).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml

from niphas_common import tracing
from niphas_common.bus.consumer import Delivery
from niphas_operator import children
from niphas_operator.children import PodSettings
from niphas_operator.pipeline import matches, stale_build, stamp
from niphas_operator.reconciler import Publish, desired_path, push_request
from niphas_operator.status import moved_to
from niphas_operator.workload import Workload, program_of
from niphas_schemas import BuildDone

log = logging.getLogger(__name__)

STATE_FILE = ".niphas-state.json"


class Renderer:
    def __init__(
        self, workloads_dir: Path, render_dir: Path, pod: PodSettings, publish: Publish
    ) -> None:
        self._workloads_dir = workloads_dir
        self._render_dir = render_dir
        self._pod = pod
        self._publish = publish
        self._state_path = render_dir / STATE_FILE

    def workloads(self) -> list[Workload]:
        found = []
        for path in sorted(self._workloads_dir.glob("*.y*ml")):
            for doc in yaml.safe_load_all(path.read_text()):
                if not isinstance(doc, dict) or doc.get("kind") != "NiphasWorkload":
                    continue
                meta = doc.setdefault("metadata", {})
                meta.setdefault("namespace", "default")
                meta.setdefault("uid", "")
                entry = dict(self._state().get(f"{meta['namespace']}/{meta['name']}", {}))
                if pinned := entry.pop("pinned", None):
                    doc.setdefault("spec", {})["storePath"] = pinned
                doc["status"] = entry
                found.append(Workload(doc))
        return found

    async def render_all(self) -> list[Path]:
        written: list[Path] = []
        for workload in self.workloads():
            desired = desired_path(workload)
            if desired is None:
                await self._publish(push_request(workload))
                continue
            command = children.resolved_command(workload, desired.store_path, desired.main_program)
            traceparent = None if desired.pinned else workload.obj["status"].get("traceparent")
            manifests = {
                "deployment.yaml": children.deployment(
                    workload, desired.store_path, command, self._pod, traceparent
                ),
                "service.yaml": children.service(workload),
                "pdb.yaml": children.disruption_budget(workload, "policy/v1"),
            }
            folder = self._render_dir / workload.namespace / workload.name
            folder.mkdir(parents=True, exist_ok=True)
            for filename, manifest in manifests.items():
                target = folder / filename
                if manifest is None:
                    target.unlink(missing_ok=True)
                    continue
                manifest["metadata"].pop("ownerReferences", None)
                if _write_if_changed(target, yaml.safe_dump(manifest, sort_keys=False)):
                    written.append(target)
        return written

    async def on_build_done(self, event: BuildDone, delivery: Delivery) -> None:
        if event.status == "failed":
            log.warning(
                "build of %s at %s failed; manifests unchanged", event.attribute, event.commit
            )
            return
        out = next((o for o in event.outputs if o.name == "out"), event.outputs[0])
        state = self._state()
        traceparent = tracing.inject({}).get("traceparent")
        for workload in self.workloads():
            if not matches(workload, event.repository, event.commit, event.attribute, event.ref):
                continue
            key = f"{workload.namespace}/{workload.name}"
            if reason := stale_build(workload, event):
                log.info("%s %s", key, reason)
                continue
            state[key] = {
                **state.get(key, {}),
                **moved_to(workload, out.path, event.commit, program_of(out.path)),
                "mainProgram": program_of(out.path),
                "pushedAt": stamp(event.pushed_at),
                "traceparent": traceparent,
            }
        self._save(state)
        await self.render_all()

    def pin(self, namespace: str, name: str, store_path: str | None) -> None:
        """Rollback without a cluster: pin the workload to `store_path` (None: unpin, it
        follows builds again). The caller re-renders."""
        self.find(namespace, name)
        state = self._state()
        entry = state.setdefault(f"{namespace}/{name}", {})
        if store_path is None:
            entry.pop("pinned", None)
        else:
            entry["pinned"] = store_path
        self._save(state)

    def find(self, namespace: str, name: str) -> Workload:
        for workload in self.workloads():
            if (workload.namespace, workload.name) == (namespace, name):
                return workload
        raise LookupError(f"no NiphasWorkload {namespace}/{name} in {self._workloads_dir}")

    def _save(self, state: dict[str, Any]) -> None:
        self._render_dir.mkdir(parents=True, exist_ok=True)
        _write_if_changed(self._state_path, json.dumps(state, indent=1, sort_keys=True))

    def _state(self) -> dict[str, Any]:
        if not self._state_path.exists():
            return {}
        loaded = json.loads(self._state_path.read_text())
        return loaded if isinstance(loaded, dict) else {}


def _write_if_changed(path: Path, text: str) -> bool:
    if path.exists() and path.read_text() == text:
        return False
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return True
