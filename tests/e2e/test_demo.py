"""The main job end to end, as `make demo` runs it (`--ci`): real nats-server, nix, mounts and
the five services as separate processes under `niphas up`. A signed webhook -> the app answers
HTTP from the closure the CSI driver mounted -> a second push -> the new version -> rollback ->
the old version. Spans go to an OTLP receiver run by the test: the first push is one trace from
the webhook to the mount, across every service, with each span's parent in the trace. After
the run each service's /metrics carried its key series."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.otlp_receiver import ReceivedSpan, otlp_receiver
from tests.helpers import eventually, wait_or_kill_group
from tests.niphas_csi.conftest import unmount_below

pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.nix, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]

# Each stage of the pipeline, as (service.name, span name) the services record.
STAGES = [
    ("niphas-eval", "publish push.received"),  # the webhook accepted
    ("niphas-eval", "process push.received"),  # the evaluation
    ("niphas-eval", "publish eval.done"),
    ("niphas-builder", "process eval.done"),  # the build and the cache push
    ("niphas-builder", "publish build.done"),
    ("niphas-operator", "process build.done"),  # the operator moves the workload
    ("niphas-csi", "NodePublishVolume"),  # the mount...
    ("niphas-csi", "publish path.wanted"),  # ...asks the mesh for the closure
    ("niphas-mesh", "process path.wanted"),  # the mesh fetch
    ("niphas-mesh", "publish path.available"),
]

# Per service, series that must have a sample after the run (regular expressions).
KEY_SERIES = {
    "eval": [r'niphas_eval_webhooks_total\{forge="github",outcome="accepted"\} [1-9]',
             r"niphas_eval_seconds_count [1-9]",
             r'niphas_consumer_pending\{consumer="eval-workers",stream="PUSH_RECEIVED"\} \d'],
    "builder": [r"niphas_builder_build_seconds_count [1-9]",
                r'niphas_consumer_pending\{consumer="builder",stream="EVAL_DONE"\} \d'],
    "operator": [r'niphas_events_handled_total\{[^}]*consumer="operator-build-done-render"'
                 r'[^}]*outcome="acked"[^}]*\} [1-9]'],
    "csi": [r'niphas_csi_publish_seconds_count\{outcome="ok"\} [1-9]'],
    "mesh": [r'niphas_consumer_pending\{consumer="mesh-demo-node",stream="PATH_WANTED"\} \d',
             r'niphas_mesh_fetched_bytes_total\{holder_kind="cache",node="demo-node"\} [1-9]'],
}  # fmt: skip


def run_demo(state: Path, result: Path, otlp: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "demo"),
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp,
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    env.pop("NATS_URL", None)
    argv = [sys.executable, "-m", "niphas_demo", "--ci", "--state-dir", str(state)]
    return subprocess.Popen(
        [*argv, "--result", str(result)], env=env, cwd=ROOT, start_new_session=True
    )


def assert_one_trace(spans: list[ReceivedSpan]) -> None:
    ids = {s.span_id for s in spans}
    roots = [s for s in spans if not s.parent_span_id]
    assert [(r.service, r.name) for r in roots] == [("niphas-eval", "publish push.received")]
    orphans = [
        (s.service, s.name) for s in spans if s.parent_span_id and s.parent_span_id not in ids
    ]
    assert orphans == []
    seen = {(s.service, s.name) for s in spans}
    assert [stage for stage in STAGES if stage not in seen] == []
    by_id = {s.span_id: s for s in spans}

    def ancestors(span: ReceivedSpan) -> list[str]:
        chain = []
        while span.parent_span_id:
            span = by_id[span.parent_span_id]
            chain.append(span.name)
        return chain

    # The fetch descends from the mount, the mount from the build, the build from the push.
    fetch = next(s for s in spans if (s.service, s.name) == ("niphas-mesh", "process path.wanted"))
    chain = ancestors(fetch)
    for name in ("NodePublishVolume", "process build.done", "process eval.done"):
        assert name in chain


async def test_demo_push_serve_change_rollback_one_trace(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("the demo mounts closures and must run as root")
    state, result = tmp_path / "state", tmp_path / "result.json"
    try:
        async with otlp_receiver() as receiver:
            proc = run_demo(state, result, receiver.url)
            code = await wait_or_kill_group(proc, 240)
            assert code == 0
            outcome: dict[str, Any] = json.loads(result.read_text())
            pages = [(what, page) for what, page in outcome["served"]]
            assert [what for what, _ in pages] == ["v1", "v2", "rollback"]
            assert "Niphas demo v1" in pages[0][1]
            assert "Niphas demo v2" in pages[1][1]
            assert "Niphas demo v1" in pages[2][1]
            v1, v2 = outcome["pushes"]
            assert v1["store_path"] != v2["store_path"]
            first = v1["trace_id"]
            # Spans are exported in batches; the services flushed theirs when they stopped.
            await eventually(
                lambda: (
                    {("niphas-mesh", "publish path.available")}
                    <= {(s.service, s.name) for s in receiver.trace(first)}
                ),
                timeout_s=20,
            )
            assert_one_trace(receiver.trace(first))
            for service, series in KEY_SERIES.items():
                text = outcome["metrics"][service]
                assert [s for s in series if not re.search(s, text)] == [], service
    finally:
        unmount_below(tmp_path)
