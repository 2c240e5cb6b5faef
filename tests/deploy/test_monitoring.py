"""The Grafana dashboard and the PrometheusRule alerts (deploy/monitoring/): every metric a
panel or an alert uses exists on the /metrics of the real services, each started as its own
process (`python -m niphas_common <service>`) against a real nats-server, as `niphas up`
runs them; the files are well-formed and render with kustomize."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import unmount_below

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
KUBECTL = str(Path(sys.executable).with_name("kubectl"))
METRIC = re.compile(r"\bniphas_[a-z0-9_]+\b")
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
}

pytestmark = [pytest.mark.slow, pytest.mark.nix, pytest.mark.root]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return loaded


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((MONITORING / "prometheus-rules.yaml").read_text())
    assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["kind"] == "PrometheusRule"
    return [rule for group in doc["spec"]["groups"] for rule in group["rules"]]


def expressions() -> dict[str, str]:
    """Where each PromQL expression is used -> the expression."""
    found = {
        f"panel {p['title']!r} {t['refId']}": t["expr"]
        for p in dashboard()["panels"]
        for t in p.get("targets", [])
    }
    found.update({f"alert {r['alert']}": r["expr"] for r in rules()})
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def exposed(text: str) -> set[str]:
    """Every series name a scrape of this text can hold (families with no samples yet too:
    a labelled metric nobody used shows only its `# TYPE` line)."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            base = name.removesuffix("_total") if kind == "counter" else name
            names.add(name)
            names.update(base + suffix for suffix in SUFFIXES.get(kind, ()))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, set[str]]]:
    """The six services, each its own process, and what each one's /metrics exposes."""
    from niphas_common.nats_server import EmbeddedNats

    root = tmp_path_factory.mktemp("monitoring")
    server = EmbeddedNats(root / "nats")
    nats_url = server.start()
    ports = {
        name: free_port() for name in ("eval", "builder", "operator", "csi", "mesh", "reporter")
    }
    store = root / "node-store"
    for directory in ("workloads", "render", "pods", "cache"):
        (root / directory).mkdir()
    (root / "webhooks.yaml").write_text("{}\n")
    env = {
        **os.environ,
        "NATS_URL": nats_url,
        "NIPHAS_STATE_DIR": str(root / "state"),
        "NIPHAS_EVAL_LISTEN": f"127.0.0.1:{ports['eval']}",
        "NIPHAS_EVAL_WEBHOOK_SECRETS_FILE": str(root / "webhooks.yaml"),
        "NIPHAS_BUILDER_CACHE_URL": f"file://{root / 'cache'}",
        "NIPHAS_BUILDER_METRICS_PORT": str(ports["builder"]),
        "NIPHAS_BUILDER_METRICS_HOST": "127.0.0.1",
        "NIPHAS_OPERATOR_WORKLOADS_DIR": str(root / "workloads"),
        "NIPHAS_OPERATOR_RENDER_DIR": str(root / "render"),
        "NIPHAS_OPERATOR_METRICS_PORT": str(ports["operator"]),
        "NIPHAS_MESH_NODE": "monitoring-node",
        "NIPHAS_MESH_LISTEN": f"127.0.0.1:{ports['mesh']}",
        "NIPHAS_MESH_STORE_ROOT": str(store),
        "NIPHAS_MESH_CACHE_DIR": str(root / "cache"),
        "NIPHAS_CSI_ENDPOINT": f"unix://{root / 'csi.sock'}",
        "NIPHAS_CSI_NODE_ID": "monitoring-node",
        "NIPHAS_CSI_STORE_ROOT": str(store),
        "NIPHAS_CSI_STATE_DIR": str(root / "state"),
        "NIPHAS_CSI_ALLOWED_TARGET_ROOT": str(root / "pods"),
        "NIPHAS_CSI_METRICS_PORT": str(ports["csi"]),
        "NIPHAS_REPORTER_HTTP_PORT": str(ports["reporter"]),
    }
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    logs = {name: (root / f"{name}.log").open("wb") for name in ports}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "niphas_common", name],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=logs[name],
            start_new_session=True,
        )
        for name in ports
    }
    found: dict[str, set[str]] = {}
    try:
        deadline = time.monotonic() + 90
        while len(found) < len(ports) and time.monotonic() < deadline:
            for name, port in ports.items():
                if name in found:
                    continue
                assert procs[name].poll() is None, (root / f"{name}.log").read_text()[-3000:]
                try:
                    url = f"http://127.0.0.1:{port}/metrics"
                    with urllib.request.urlopen(url, timeout=5) as response:
                        found[name] = exposed(response.read().decode())
                except (urllib.error.URLError, ConnectionError):
                    pass
            time.sleep(0.2)
        assert set(found) == set(ports), f"no /metrics from {set(ports) - set(found)}"
        yield found
    finally:
        for proc in procs.values():
            with_group(proc, signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                with_group(proc, signal.SIGKILL)
                proc.wait()
        server.stop()
        for log in logs.values():
            log.close()
        unmount_below(root)  # what the CSI driver staged


def with_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def test_every_metric_a_panel_or_alert_uses_is_exposed(scraped: dict[str, set[str]]) -> None:
    everywhere = set().union(*scraped.values())
    missing = {
        where: sorted(set(METRIC.findall(expr)) - everywhere)
        for where, expr in expressions().items()
        if set(METRIC.findall(expr)) - everywhere
    }
    assert missing == {}
    # Each service shows its own metrics (the panels are per stage, not one lucky process).
    for service, prefix in (
        ("eval", "niphas_eval_"),
        ("builder", "niphas_builder_"),
        ("operator", "niphas_operator_"),
        ("csi", "niphas_csi_"),
        ("mesh", "niphas_mesh_"),
        ("reporter", "niphas_reporter_"),
    ):
        assert any(name.startswith(prefix) for name in scraped[service]), service


def test_the_dashboard_shows_each_stage_the_mesh_and_the_csi() -> None:
    board = dashboard()
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert [r.split(":")[0] for r in rows] == ["Pipeline", "Mesh", "CSI"]
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    for needed in (
        "niphas_eval_seconds_bucket",
        "niphas_builder_build_seconds_bucket",
        "holder_kind",
        "niphas_csi_publish_seconds_bucket",
        "niphas_events_handled_total",
    ):
        assert needed in exprs
    assert all(p["datasource"]["uid"] == "${datasource}" for p in panels)


def test_the_alerts_cover_dead_letters_stuck_consumers_and_failing_builds() -> None:
    alerts = {r["alert"]: r for r in rules()}
    assert {"NiphasDeadLetters", "NiphasConsumerStuck", "NiphasBuildsFailing"} <= set(alerts)
    assert 'outcome="dead"' in alerts["NiphasDeadLetters"]["expr"]
    assert "niphas_consumer_pending" in alerts["NiphasConsumerStuck"]["expr"]
    assert all(r["labels"]["severity"] in ("warning", "critical") for r in alerts.values())
    assert all(r["annotations"]["summary"] for r in alerts.values())


def test_the_monitoring_kustomization_renders() -> None:
    out = subprocess.run(
        [KUBECTL, "kustomize", str(MONITORING)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    objects = {(o["kind"], o["metadata"]["name"]) for o in yaml.safe_load_all(out) if o}
    assert objects == {("ConfigMap", "niphas-grafana-dashboard"), ("PrometheusRule", "niphas")}
