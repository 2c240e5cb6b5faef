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
from pathlib import Path

import aiohttp
import pytest
from rich.console import Console

from niphas_cluster.node import Node
from niphas_demo.on_cluster import SYSTEM, ClusterDemo

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
    await demo.start_cluster()
    try:
        lease = demo.kubectl.json("-n", SYSTEM, "get", "lease", "niphas-operator")
        assert lease["spec"]["holderIdentity"].startswith("niphas-operator-")
        await demo.push("v1")
        first_uid, _ = await demo.serving("v1")

        # v2 while the pods that evaluate and build it are deleted.
        pushing = asyncio.create_task(demo.push("v2"))
        await asyncio.sleep(1.0)
        for name in ("niphas-eval-worker", "niphas-builder"):
            demo.kubectl("-n", SYSTEM, "delete", "pod", "-l", f"app.kubernetes.io/name={name}",
                         "--wait=false")  # fmt: skip
        await pushing
        second_uid, _ = await demo.serving("v2")
        assert second_uid != first_uid

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

        demo.niphas("rollback", "web")
        third_uid, _ = await demo.serving("v1")
        assert third_uid not in (first_uid, second_uid)
    finally:
        with contextlib.suppress(Exception):
            await demo.close()
