"""What the operator gives a workload's pods, on the real node (kubelet 1.20, containerd,
the stub pause image): a program from the closure, run inside the pod, finds its user in the
minimal /etc/passwd, reads /etc/group, /etc/nsswitch.conf and the CA certificates, and writes
/tmp; the pods tolerate not-ready and unreachable nodes for a bounded time; spec.ingress is
applied as an Ingress routing its host to the workload's Service; the PodDisruptionBudget of
two replicas goes without `unhealthyPodEvictionPolicy` (1.20 does not keep it); `kubectl get
nw` shows the phase and reason, and `kubectl describe nw` the lifecycle Events."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from niphas_cluster.node import Node
from niphas_demo.layout import NAMESPACE, WORKLOAD
from tests.cluster.node_stack import NodeDemo
from tests.cluster.pods import wait_for
from tests.node_harness import Kubectl

pytestmark = [pytest.mark.root, pytest.mark.nix, pytest.mark.slow, pytest.mark.timeout(600)]

PROBE = (
    "id -un; id -gn; grep -c . /etc/passwd; grep '^hosts:' /etc/nsswitch.conf; "
    "grep -c 'BEGIN CERTIFICATE' /etc/ssl/certs/ca-certificates.crt; echo $SSL_CERT_FILE; "
    "echo written > /tmp/probe && cat /tmp/probe"
)
"""Run by the closure's own busybox in the pod: user and group names come from /etc."""


def _busybox(demo: NodeDemo, status: dict[str, Any]) -> str:
    """The closure's path holding bin/busybox (the sample app's tools)."""
    for path in status["closurePaths"]:
        if (demo.layout.node_store / path.lstrip("/") / "bin" / "busybox").exists():
            return f"{path}/bin/busybox"
        if (Path(path) / "bin" / "busybox").exists():
            return f"{path}/bin/busybox"
    raise AssertionError(f"no busybox in the closure {status['closurePaths']}")


def _workload(kubectl: Kubectl) -> dict[str, Any]:
    out = kubectl("-n", NAMESPACE, "get", "nw", WORKLOAD, "-o", "json").stdout
    loaded: dict[str, Any] = json.loads(out)
    return loaded


async def test_a_workloads_pods_get_etc_tmp_tolerations_and_its_ingress(
    real_node: Node, node_kubectl: Kubectl, tmp_path: Path
) -> None:
    demo = NodeDemo(tmp_path / "state", real_node, node_kubectl)
    env = demo.node_env(demo.prepare())
    demo.install()
    await demo.start_on_node(env)
    try:
        await demo.push("v1")
        await demo.serving("v1")
        obj = wait_for(
            node_kubectl, NAMESPACE, "nw", WORKLOAD,
            lambda o: o.get("status", {}).get("phase") == "Running", 120,
        )  # fmt: skip
        printed = node_kubectl("-n", NAMESPACE, "get", "nw", WORKLOAD).stdout
        assert "Running" in printed and "MinimumReplicasAvailable" in printed, printed

        (pod,) = demo.pods()
        busybox = _busybox(demo, obj["status"])
        probe = node_kubectl(
            "-n", NAMESPACE, "exec", pod["metadata"]["name"], "-c", "app", "--",
            busybox, "sh", "-c", PROBE, check=False,
        )  # fmt: skip
        lines = probe.stdout.splitlines()
        assert probe.returncode == 0, probe.stderr
        # The stub image's user has a name and a group; the files are the operator's.
        assert lines[0] in ("root", "app", "nobody"), lines
        assert lines[1] in ("root", "app", "nogroup"), lines
        assert lines[2] == "3"
        assert lines[3] == "hosts: files dns"
        assert int(lines[4]) > 0, "the CA certificates are there"
        assert lines[5] == "/etc/ssl/certs/ca-certificates.crt"
        assert lines[6] == "written"
        keys = {t["key"]: t for t in pod["spec"]["tolerations"]}
        assert keys["node.kubernetes.io/not-ready"]["tolerationSeconds"] == 60
        assert keys["node.kubernetes.io/unreachable"]["tolerationSeconds"] == 60

        # Two replicas and a host: an Ingress to the Service, a PDB, pods spread.
        patch = {"spec": {"replicas": 2, "ingress": {"host": "web.niphas.test", "port": 80}}}
        node_kubectl(
            "-n", NAMESPACE, "patch", "nw", WORKLOAD, "--type=merge", "-p", json.dumps(patch)
        )
        ingress = wait_for(node_kubectl, NAMESPACE, "ingress", WORKLOAD, lambda o: True, 60)
        (rule,) = ingress["spec"]["rules"]
        assert rule["host"] == "web.niphas.test"
        backend = rule["http"]["paths"][0]["backend"]["service"]
        assert backend == {"name": WORKLOAD, "port": {"number": 80}}
        pdb = wait_for(node_kubectl, NAMESPACE, "pdb", WORKLOAD, lambda o: True, 60)
        assert "unhealthyPodEvictionPolicy" not in pdb["spec"]
        wait_for(
            node_kubectl, NAMESPACE, "deployment", WORKLOAD,
            lambda o: o.get("status", {}).get("availableReplicas") == 2, 120,
        )  # fmt: skip
        # The Service behind the Ingress has both pods as its endpoints.
        deadline = time.monotonic() + 60
        addresses: list[Any] = []
        while time.monotonic() < deadline and len(addresses) != 2:
            endpoints = node_kubectl(
                "-n", NAMESPACE, "get", "endpoints", WORKLOAD, "-o", "json"
            ).stdout
            subsets = json.loads(endpoints).get("subsets") or [{}]
            addresses = subsets[0].get("addresses") or []
            time.sleep(0.3)
        assert len(addresses) == 2

        described = node_kubectl("-n", NAMESPACE, "describe", "nw", WORKLOAD).stdout
        for reason in ("Evaluated", "Built", "Provisioned", "Available"):
            assert reason in described, described
        assert obj["status"]["storePath"] in described
    finally:
        await demo.close_on_node()
