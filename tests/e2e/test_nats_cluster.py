"""The pipeline on a 3-server JetStream cluster (3 replicas): a push becomes a build.done while
the leader of the stream between evaluation and build is killed midway (the eval worker in
this process, the real `niphas builder` as its own process, both given every server's URL);
the webhook answers 503 with Retry-After while the cluster has no quorum and 202 again once
it has, without a restart; `niphas up` with NIPHAS_NATS_CLUSTER_SIZE=3 embeds a cluster and
provisions every stream with 3 replicas."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from niphas_common.bus import inspect
from niphas_common.bus.bus import Bus
from niphas_common.bus.topology import stream_configs
from niphas_common.nats_cluster import EmbeddedNatsCluster
from niphas_common.nats_server import URL_FILE
from niphas_common.settings import NatsSettings
from niphas_eval.worker import EvalWorker
from niphas_schemas import BuildDone, EvalDone
from tests.nats_harness import serving_restarted
from tests.niphas_builder.processes import BuilderProcess
from tests.niphas_eval.conftest import (  # noqa: F401  (the eval fixtures)
    GitRepo,
    Ingress,
    eval_settings,
    github_push,
    ingress,
    make_repo,
    push_for,
    worker,
)
from tests.nix_harness import CacheKey

UP_WITHOUT_SERVICES = """
import sys
from pathlib import Path
from niphas_common.up import run_up
sys.exit(run_up(Path(sys.argv[1]), [], None))
"""


@pytest.fixture
def bus(cluster_bus: Bus) -> Bus:
    """The eval fixtures (worker, ingress) publish and consume through the cluster."""
    return cluster_bus


async def stored(bus: Bus, subject: str) -> list[bytes]:
    return [m.data for m in await inspect.view(bus.js, subject, 1000)]


async def send(ingress: Ingress, commit: str) -> tuple[int, str | None]:  # noqa: F811
    """POST a signed GitHub push; the status and the Retry-After header."""
    delivery = github_push(
        "github-secret", clone_url="https://github.example/acme/app.git", after=commit
    )
    async with ingress.http.post(
        ingress.url + delivery.path, data=delivery.body, headers=delivery.headers
    ) as resp:
        return resp.status, resp.headers.get("Retry-After")


async def test_webhook_answers_503_with_retry_after_without_quorum_then_202_again(
    ingress: Ingress,  # noqa: F811
    nats_cluster: EmbeddedNatsCluster,
) -> None:
    assert (await send(ingress, "1" * 40))[0] == 202
    nats_cluster.kill(0)
    nats_cluster.kill(2)
    status, retry_after = await asyncio.wait_for(send(ingress, "2" * 40), 30)
    assert status == 503
    assert retry_after is not None and int(retry_after) > 0

    await asyncio.to_thread(nats_cluster.restart, 2)
    # The same ingress and bus, not restarted: accepted again once a stream leader exists.
    statuses: list[int] = []

    async def accepted() -> bool:
        statuses.append((await send(ingress, "3" * 40))[0])
        return statuses[-1] == 202

    for _ in range(60):
        if await accepted():
            break
        await asyncio.sleep(0.5)
    assert statuses[-1] == 202, statuses
    assert set(statuses) <= {202, 503}  # while electing: 503, never another error


@pytest.mark.nix
@pytest.mark.timeout(300)
async def test_a_push_becomes_a_build_done_with_a_server_killed_midway(
    bus: Bus,
    nats_cluster: EmbeddedNatsCluster,
    cluster_settings: NatsSettings,
    worker: EvalWorker,  # noqa: F811
    make_repo: Callable[..., GitRepo],  # noqa: F811
    cache_key: CacheKey,
    tmp_path: Path,
) -> None:
    repo = make_repo()
    commit = repo.commit(greeting="on a cluster")
    builders = [BuilderProcess("builder-on-cluster", tmp_path, nats_cluster.url, cache_key)]
    restarts: list[str] = []

    def keep_builder_running() -> None:
        """Start the builder again when it exits, as `niphas up` or Kubernetes would."""
        if builders[-1].proc.poll() is not None:
            restarts.append(f"builder exited with {builders[-1].proc.returncode}")
            builders.append(
                BuilderProcess("builder-on-cluster", tmp_path, nats_cluster.url, cache_key)
            )

    async def build_dones() -> list[BuildDone]:
        keep_builder_running()
        try:
            return [BuildDone.model_validate_json(d) for d in await stored(bus, "build.done")]
        except Exception:  # a read while the stream elects its leader
            return []

    try:
        async with serving_restarted(bus, [worker.subscription()], restarts):
            await bus.publish(push_for(repo, commit))
            for _ in range(600):
                if await stored(bus, "eval.done"):
                    break
                await asyncio.sleep(0.1)
            [data] = await stored(bus, "eval.done")
            eval_done = EvalDone.model_validate_json(data)
            assert eval_done.status == "succeeded", eval_done.error
            # Midway: the server leading the stream the builder consumes goes away.
            leader = nats_cluster.stream_leader("EVAL_DONE")
            assert leader is not None
            nats_cluster.kill(leader)
            for _ in range(1200):
                if await build_dones():
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(2)  # a second build.done would arrive now
            dones = await build_dones()
    finally:
        for builder in builders:
            builder.stop()
    logs = builders[0].log()  # every builder process writes to the same log
    assert len(dones) == 1, logs
    [done] = dones
    # "cached" when the delivery retried after the kill finds its own build already pushed
    assert done.status in ("built", "cached"), logs
    assert done.commit == commit
    [attribute] = eval_done.attributes
    assert {o.path for o in done.outputs} == set(attribute.outputs.values())
    assert nats_cluster.stream_leader("EVAL_DONE") not in (None, leader)
    if restarts:
        logging.getLogger(__name__).warning("restarted after the kill: %s", restarts)


def test_niphas_up_embeds_a_cluster_with_three_replicas(tmp_path: Path) -> None:
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "NIPHAS_NATS_REPLICAS")}
    env.update(NIPHAS_STATE_DIR=str(state), NIPHAS_NATS_CLUSTER_SIZE="3")
    state.mkdir()
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        # No service: this is about the NATS that `niphas up` embeds.
        proc = subprocess.Popen(
            [sys.executable, "-c", UP_WITHOUT_SERVICES, str(state)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while not (state / URL_FILE).exists() or "NATS JetStream at" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        url = (state / URL_FILE).read_text().strip()
        assert len(url.split(",")) == 3
        assert "3 replica(s)" in log.read_text()

        async def replicas() -> dict[str, int]:
            check = await Bus.connect(NatsSettings(url=url), name="test", provision=False)
            try:
                return {
                    config.name or "": (
                        await check.js.stream_info(config.name or "")
                    ).config.num_replicas
                    or 0
                    for config in stream_configs(NatsSettings(url=url))
                }
            finally:
                await check.close()

        assert set(asyncio.run(replicas()).values()) == {3}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
