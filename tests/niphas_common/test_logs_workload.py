"""`niphas logs workload <namespace>/<name>`: the NiphasWorkload's status read from a real
kube-apiserver names the commit it runs, whose builds' logs come from the real log stream;
an unknown workload, one that runs nothing yet, a missing kubeconfig or no cluster at all is
one line and exit 1."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from niphas_common.bus.build_logs import build_logs
from niphas_common.bus.bus import Bus
from niphas_schemas import EvalDone, EvaluatedAttribute
from tests.kube_harness import KubeApiServer
from tests.niphas_common.test_cli_failures import one_line_failure
from tests.niphas_operator.conftest import FLAKE_REF, crd  # noqa: F401  (the CRD fixture)

pytestmark = pytest.mark.slow

NIPHAS = str(Path(sys.executable).with_name("niphas"))
COMMIT = "5" * 40
DRV = "/nix/store/" + "c" * 32 + "-web.drv"


def niphas(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "NATS_URL")}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    return subprocess.run(
        [NIPHAS, "logs", *args], env=env, capture_output=True, text=True, timeout=60
    )


def _workload(server: KubeApiServer, namespace: str, name: str, commit: str | None) -> None:
    manifest = {
        "apiVersion": "niphas.io/v1alpha1",
        "kind": "NiphasWorkload",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"flakeRef": FLAKE_REF, "attribute": "web"},
    }
    server.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    if commit is not None:
        status = {"status": {"phase": "Running", "commit": commit}}
        server.kubectl(
            "-n", namespace, "patch", "niphasworkload", name, "--subresource=status",
            "--type=merge", "-p", json.dumps(status),
        )  # fmt: skip


async def test_the_logs_of_the_commit_a_workload_runs(
    crd: KubeApiServer,  # noqa: F811
    kube_namespace: str,
    bus: Bus,
    nats_url: str,
) -> None:
    logs = await build_logs(bus, max_bytes=1024**2, max_age_s=3600)
    attribute = EvaluatedAttribute(
        attribute="web",
        attr_path="packages.x86_64-linux.web",
        system="x86_64-linux",
        drv_path=DRV,
        outputs={"out": DRV[:-4]},
    )
    await bus.publish(
        EvalDone(
            push_event_id="push-workload-logs",
            repository="file:///srv/git/demo.git",
            commit=COMMIT,
            status="succeeded",
            attributes=(attribute,),
        )
    )
    await logs.start(DRV)
    await logs.append(DRV, b"building web\n")
    await logs.finish(DRV, "built")
    _workload(crd, kube_namespace, "web", COMMIT)
    _workload(crd, kube_namespace, "fresh", None)
    config = str(crd.kubeconfig)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return niphas("workload", *args, "--nats-url", nats_url)

    shown = await asyncio.to_thread(run, f"{kube_namespace}/web", "--kubeconfig", config)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"==> {kube_namespace}/web runs commit {COMMIT} <==\n")
    assert f"==> web ({'c' * 32}) <==\nbuilding web\n\n[built]\n" in shown.stdout

    unknown = await asyncio.to_thread(run, f"{kube_namespace}/nope", "--kubeconfig", config)
    one_line_failure(unknown, "niphas logs: no workload", f"{kube_namespace}/nope")
    assert unknown.returncode == 1
    fresh = await asyncio.to_thread(run, f"{kube_namespace}/fresh", "--kubeconfig", config)
    one_line_failure(fresh, f"{kube_namespace}/fresh runs no built commit yet")
    malformed = await asyncio.to_thread(run, "Not_A/Name", "--kubeconfig", config)
    one_line_failure(malformed, "expected <namespace>/<name>")


def test_no_kubeconfig_or_no_cluster_is_one_line(tmp_path: Path) -> None:
    # The workload is looked up before NATS is asked anything (nothing listens there).
    nats = ("--nats-url", "nats://127.0.0.1:1")
    missing = niphas("workload", "apps/web", "--kubeconfig", str(tmp_path / "nope"), *nats)
    one_line_failure(missing, "niphas logs: apps/web: kubeconfig", "no such file")
    assert missing.returncode == 1
    nothing = niphas("workload", "apps/web", *nats)
    one_line_failure(nothing, "no cluster configured")
    assert nothing.returncode == 1
