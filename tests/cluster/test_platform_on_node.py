"""The platform itself as pods on the real node (`make demo-cluster` as a test): the `node`
overlay applied with kubectl, every platform pod Ready and reaching NATS and the API through
Services, cluster DNS and its service account; a signed webhook to the eval Service ends in
the operator's pods serving v1; a push whose eval worker and builder pods are deleted mid-flow
still ends served (redelivered, nothing lost); `kubectl rollout restart` of every platform
workload keeps the app answering (its mount survives the csi pod's restart); `niphas rollback`
serves v1 again."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path

import aiohttp
import pytest
from rich.console import Console

from niphas_cluster.layout import GATEWAY
from niphas_cluster.node import Node
from niphas_demo.on_cluster import SYSTEM, ClusterDemo
from tests.e2e.otlp_receiver import Receiver, otlp_receiver
from tests.e2e.test_demo import STAGES
from tests.helpers import eventually

# The demo's stages up to the mount. The operator preheats the node before a rollout (its
# store label selects it), so by the time the kubelet mounts, the closure is there and the csi
# pod asks the mesh for nothing: the mesh's fetch answers the operator's path.wanted.
MOUNT_STAGES = [stage for stage in STAGES if "path." not in stage[1]]

pytestmark = [pytest.mark.root, pytest.mark.nix, pytest.mark.slow, pytest.mark.timeout(1500)]


async def _answering(url: str, stop: asyncio.Event, failures: list[str]) -> int:
    """GET `url` every 0.2 s until `stop`; failures recorded; returns the number of answers."""
    answers = 0
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            try:
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
                    if response.status == 200:
                        answers += 1
                    else:
                        failures.append(f"HTTP {response.status}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                failures.append(repr(exc))
            await asyncio.sleep(0.2)
    return answers


def _restart_everything(demo: ClusterDemo) -> list[str]:
    restarted = []
    for kind in ("deployment", "daemonset", "statefulset"):
        for name in demo.kubectl("-n", SYSTEM, "get", kind, "-o", "name").stdout.split():
            demo.kubectl("-n", SYSTEM, "rollout", "restart", name)
            demo.kubectl("-n", SYSTEM, "rollout", "status", name, "--timeout=300s", timeout=330)
            restarted.append(name)
    return restarted


async def test_the_platform_as_pods_through_deletions_and_restarts(
    real_node: Node, niphas_image: str, tmp_path: Path
) -> None:
    demo = ClusterDemo(tmp_path / "state", Console(quiet=True), real_node.kubeconfig)
    demo.prepare_cluster()
    async with otlp_receiver(GATEWAY) as receiver:
        try:
            await demo.start_cluster(receiver.url)
            await _story(demo, receiver)
        finally:
            with contextlib.suppress(Exception):
                await demo.close()
            # The node's next tests run their own csi driver. (An uninstall that fails after
            # a failed story must not hide why the story failed.)
            failed = sys.exc_info()[0] is not None
            with contextlib.suppress(*((Exception,) if failed else ())):
                demo.uninstall()


async def _story(demo: ClusterDemo, receiver: Receiver) -> None:
    def leader() -> str:
        lease = demo.kubectl.json("-n", SYSTEM, "get", "lease", "niphas-operator")
        return str(lease["spec"].get("holderIdentity") or "")

    # The operator pod holds the leader Lease (through its service account and RBAC).
    await eventually(lambda: leader().startswith("niphas-operator-"), timeout_s=60)
    v1 = await demo.push("v1")
    first_uid, _ = await demo.serving("v1")

    # One trace from the webhook to the mount, across the platform's pods.
    def missing() -> list[tuple[str, str]]:
        seen = {(s.service, s.name) for s in receiver.trace(v1.trace_id)}
        return [stage for stage in MOUNT_STAGES if stage not in seen]

    with contextlib.suppress(AssertionError):
        await eventually(lambda: not missing(), timeout_s=30)
    assert missing() == []
    second_uid = await _v2_while_its_pods_are_deleted(demo, first_uid)
    await _restarts_keep_the_app_answering(demo, second_uid)
    demo.niphas("rollback", "web")
    third_uid, _ = await demo.serving("v1")
    assert third_uid not in (first_uid, second_uid)


async def _v2_while_its_pods_are_deleted(demo: ClusterDemo, first_uid: str) -> str:
    """A push whose eval worker is going away as it arrives and whose builder pod is deleted
    while it builds (a push's build takes about a second here)."""

    def delete(name: str) -> None:
        demo.kubectl("-n", SYSTEM, "delete", "pod", "-l", f"app.kubernetes.io/name={name}",
                     "--wait=false")  # fmt: skip

    delete("niphas-eval-worker")
    pushing = asyncio.create_task(demo.push("v2"))
    await asyncio.sleep(0.3)
    delete("niphas-builder")
    await pushing
    second_uid, _ = await demo.serving("v2")
    assert second_uid != first_uid
    return second_uid


async def _restarts_keep_the_app_answering(demo: ClusterDemo, second_uid: str) -> None:
    pod = next(p for p in demo.pods() if p["metadata"]["uid"] == second_uid)
    url = f"http://{pod['status']['podIP']}:{demo.ports.app}/"
    stop, failures = asyncio.Event(), list[str]()
    poller = asyncio.create_task(_answering(url, stop, failures))
    restarted = await asyncio.to_thread(_restart_everything, demo)
    stop.set()
    answers = await poller
    assert {"daemonset.apps/niphas-csi", "daemonset.apps/niphas-mesh"} <= set(restarted)
    assert answers > 0 and failures == [], failures[:5]
    assert (await demo.serving("v2"))[0] == second_uid, "the app's pod was never replaced"
