"""The data plane on the real node: a push through the whole pipeline ends in pods the real
kubelet runs, their closure mounted by our CSI driver (registered with the kubelet through its
plugin registration API), the app answering HTTP on the pod IP; the operator in cluster mode
moves the workload to v2 on build.done and `niphas rollback` moves it back, with the pods
replaced each time; the driver restarted while a pod runs keeps its mount and lease; deleting
the workload unpublishes every volume."""

from __future__ import annotations

import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from niphas_cluster.node import Node, restart_kubelet
from niphas_common.leases import leases_root
from niphas_demo.flow import until
from niphas_demo.layout import NAMESPACE, WORKLOAD
from tests.cluster.node_stack import (
    KUBELET_ROOT,
    NodeDemo,
    closure_pod,
    mount_failures,
    node_mounts,
)
from tests.node_harness import Kubectl

pytestmark = [pytest.mark.root, pytest.mark.nix, pytest.mark.slow, pytest.mark.timeout(900)]


def _printed_ready(kubectl: Kubectl) -> str:
    """`kubectl get nw` READY column as a user sees it."""
    header, _, row = kubectl("-n", NAMESPACE, "get", "nw", WORKLOAD).stdout.partition("\n")
    columns = dict(zip(header.split(), row.split(), strict=False))
    return columns.get("READY", "")


def _csi_mounts() -> list[str]:
    """Mounts of our driver's volumes in kubelet's pods dir."""
    return [m for m in node_mounts(KUBELET_ROOT / "pods") if "/kubernetes.io~csi/" in m]


def _csi_leases(demo: NodeDemo) -> list[str]:
    root = leases_root(demo.layout.node_store)
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


async def test_push_to_pods_on_a_real_kubelet(
    real_node: Node, node_kubectl: Kubectl, tmp_path: Path
) -> None:
    demo = NodeDemo(tmp_path / "state", real_node, node_kubectl)
    env = demo.node_env(demo.prepare())
    demo.install()
    await demo.start_on_node(env)
    try:
        await _bad_volumes_fail_with_the_drivers_reason(node_kubectl)
        await demo.push("v1")
        first_uid, page = await demo.serving("v1")
        assert "served from a Nix closure" in page
        await until("READY 1", _async(lambda: _printed_ready(node_kubectl) == "1"), 60)
        leases = _csi_leases(demo)
        assert leases, "a published volume holds a lease (GC root) on the node store"
        assert any(first_uid in m for m in _csi_mounts())

        # The driver restarted while the pod runs: the mount and the lease stay.
        assert demo.stack is not None
        csi_pid = demo.stack.service_pids()["csi"]
        os.kill(csi_pid, signal.SIGKILL)
        await until(
            "the csi driver back",
            _async(lambda: demo.stack is not None and demo.stack.service_pids().get("csi")
                   not in (None, csi_pid)),
            60,
        )  # fmt: skip
        assert (await demo.serving("v1"))[0] == first_uid
        assert _csi_leases(demo) == leases

        await demo.push("v2")
        second_uid, _ = await demo.serving("v2")
        assert second_uid != first_uid

        # kubelet restarted: it finds the driver's registration again and mounts new pods.
        restart_kubelet(real_node)
        demo.niphas("rollback", WORKLOAD, "--namespace", NAMESPACE)
        third_uid, _ = await demo.serving("v1")
        assert third_uid not in (first_uid, second_uid)
    finally:
        await demo.close_on_node()
    assert not _csi_mounts(), "every closure volume was unpublished"
    assert _csi_leases(demo) == [], "every lease was released"


async def _bad_volumes_fail_with_the_drivers_reason(kubectl: Kubectl) -> None:
    """A malformed store path and one no holder has: the pod gets a FailedMount event with
    the driver's message naming the problem (not a hang), and nothing is mounted."""
    missing = f"/nix/store/{'0' * 32}-nothing-holds-this"
    cases = {"malformed": ("/etc/shadow", "storePath"), "missing": (missing, missing)}
    for name, (path, _) in cases.items():
        kubectl("apply", "-f", "-", input=closure_pod(name, path))
    for name, (_, expected) in cases.items():

        def failed(pod: str = name, text: str = expected) -> bool:
            return any(text in message for message in mount_failures(kubectl, pod))

        await until(f"a FailedMount event on {name} naming {expected}", _async(failed), 120)
        kubectl("-n", NAMESPACE, "delete", "pod", name, "--wait=false")
    assert not _csi_mounts()


def _async(check: Callable[[], bool]) -> Callable[[], Awaitable[bool | None]]:
    """`check` as a probe for `until`."""

    async def probe() -> bool | None:
        return True if check() else None

    return probe
