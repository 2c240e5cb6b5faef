"""The file store (render mode's workloads, without a server): the API server's rules kept
on files (generation bumped by spec changes and pins, stale resourceVersions refused,
merge-patch semantics), children rendered without owner references and only when changed,
the lock shared with `niphas rollback`, and the rollback command's own reconcile."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from niphas_common.kube.client import KubeConflict
from niphas_common.kube.watch import LISTED, SYNCED
from niphas_operator.file_store import RACY_NS, FileStore, merge_patch
from niphas_operator.rollback import rollback, unpin
from niphas_operator.workload import Workload
from tests.niphas_operator.conftest import store_path, workload

KEY = ("default", "web")


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    (tmp_path / "workloads").mkdir()
    (tmp_path / "workloads" / "web.yaml").write_text(yaml.safe_dump(workload("web")))
    return FileStore(tmp_path / "workloads", tmp_path / "render", tmp_path / "status", poll_s=0.05)


def test_merge_patch_follows_rfc_7386() -> None:
    assert merge_patch({"a": 1, "b": {"c": 2, "d": 3}}, {"b": {"c": None, "e": 4}}) == {
        "a": 1,
        "b": {"d": 3, "e": 4},
    }
    assert merge_patch({"a": [1, 2]}, {"a": [3]}) == {"a": [3]}


async def test_generation_follows_the_spec_and_stale_writes_are_refused(
    store: FileStore,
) -> None:
    first = await store.get(KEY)
    assert first is not None and first["metadata"]["generation"] == 1
    rv = first["metadata"]["resourceVersion"]
    written = await store.merge_patch_status(
        KEY, {"metadata": {"resourceVersion": rv}, "status": {"phase": "Pending"}}
    )
    assert written["status"] == {"phase": "Pending"}
    assert written["metadata"]["generation"] == 1
    with pytest.raises(KubeConflict):
        await store.merge_patch_status(
            KEY, {"metadata": {"resourceVersion": rv}, "status": {"phase": "Running"}}
        )
    pinned = await store.merge_patch(KEY, {"spec": {"storePath": store_path("web-1.0")}})
    assert pinned["metadata"]["generation"] == 2
    assert pinned["spec"]["flakeRef"] and pinned["spec"]["storePath"] == store_path("web-1.0")
    edited = workload("web", replicas=3)
    (store.workloads_dir / "web.yaml").write_text(yaml.safe_dump(edited))
    after_edit = await store.get(KEY)
    assert after_edit is not None and after_edit["metadata"]["generation"] == 3
    assert after_edit["status"] == {"phase": "Pending"}


async def test_workload_files_are_parsed_again_only_when_changed(store: FileStore) -> None:
    first = await store.get(KEY)
    assert first is not None
    first["spec"]["attribute"] = "changed by the caller"  # a copy: the next read is clean
    again = await store.get(KEY)
    assert again is not None and again["spec"]["attribute"] == "web"
    path = store.workloads_dir / "web.yaml"
    # Parsed once while unchanged: an unparsable file of the same signature is not read.
    old = path.stat()
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns - 5 * RACY_NS))
    await store.get(KEY)
    stat = path.stat()
    path.write_text(path.read_text().replace("attribute: web", "attribute: {[x"))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (await store.get(KEY)) == again
    # Two edits of the same size within one clock tick: the second is still seen (a file
    # changed within the last second is parsed again).
    path.write_text(yaml.safe_dump(workload("web")))
    assert (await store.get(KEY) or {})["spec"]["attribute"] == "web"
    path.write_text(yaml.safe_dump(workload("web", attribute="bew")))
    assert (await store.get(KEY) or {})["spec"]["attribute"] == "bew"


async def test_children_are_rendered_once_without_owner_references(store: FileStore) -> None:
    obj = await store.get(KEY)
    assert obj is not None
    manifest: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "default", "ownerReferences": [{"uid": "x"}]},
        "spec": {"ports": [{"port": 80}]},
    }
    applied = await store.apply(manifest)
    target = store.render_dir / "default" / "web" / "service.yaml"
    assert "ownerReferences" not in yaml.safe_load(target.read_text())["metadata"]
    mtime = target.stat().st_mtime_ns
    assert (await store.apply(manifest))["metadata"] == applied["metadata"]
    assert target.stat().st_mtime_ns == mtime
    await store.delete("v1", "Service", KEY)
    assert not target.exists()


async def test_the_watch_lists_then_reports_changes(store: FileStore) -> None:
    events = store.workload_events()
    assert [(await anext(events)).kind for _ in range(2)] == [LISTED, SYNCED]
    await store.merge_patch(KEY, {"metadata": {"finalizers": ["niphas.io/cleanup"]}})
    changed = await asyncio.wait_for(anext(events), 5)
    assert changed.kind == "MODIFIED"
    assert changed.obj["metadata"]["finalizers"] == ["niphas.io/cleanup"]
    await events.aclose()


class StatusWriteAfterRead(FileStore):
    """The operator's status write landing between the rollback's read and its patch."""

    races = 2

    async def get(self, key: tuple[str, str]) -> dict[str, Any] | None:
        obj = await super().get(key)
        if self.races:
            self.races -= 1
            await self.merge_patch_status(key, {"status": {"phase": "Running"}})
        return obj


async def test_a_rollback_that_loses_a_race_with_a_status_write_reads_again(
    tmp_path: Path,
) -> None:
    (tmp_path / "workloads").mkdir()
    (tmp_path / "workloads" / "web.yaml").write_text(yaml.safe_dump(workload("web")))
    racing = StatusWriteAfterRead(tmp_path / "workloads", tmp_path / "render", tmp_path / "st")
    history = [
        {"revision": 2, "storePath": store_path("web-2.0")},
        {"revision": 1, "storePath": store_path("web-1.0")},
    ]
    await racing.merge_patch_status(
        KEY, {"status": {"storePath": store_path("web-2.0"), "history": history}}
    )
    entry = await rollback(racing, KEY, None)
    assert entry.store_path == store_path("web-1.0") and racing.races == 0
    pinned = await racing.get(KEY)
    assert pinned is not None and Workload(pinned).spec.store_path == store_path("web-1.0")


async def test_rollback_and_unpin_write_the_pin_under_the_lock(store: FileStore) -> None:
    obj = await store.get(KEY)
    assert obj is not None
    history = [
        {"revision": 2, "storePath": store_path("web-2.0")},
        {"revision": 1, "storePath": store_path("web-1.0")},
    ]
    await store.merge_patch_status(
        KEY, {"status": {"storePath": store_path("web-2.0"), "history": history}}
    )
    entry = await rollback(store, KEY, None)
    assert entry.store_path == store_path("web-1.0")
    pinned = await store.get(KEY)
    assert pinned is not None and Workload(pinned).spec.store_path == store_path("web-1.0")
    await unpin(store, KEY)
    unpinned = await store.get(KEY)
    assert unpinned is not None and Workload(unpinned).spec.store_path is None
    assert (store.status_dir / ".lock").exists()
