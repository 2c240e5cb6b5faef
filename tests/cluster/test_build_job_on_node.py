"""The builder's Kubernetes Job executor on the real node: a real Job pod from the platform's
image builds a derivation in its own store with Nix's sandbox on, holding no key and no host
store, uploads the unsigned outputs to the builder's staging endpoint, and the builder (the
only holder of the key) verifies and signs them into the cache, where a stock `nix` client
substitutes them; a failing build's build.done carries its log tail."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from niphas_builder.settings import BuilderSettings
from niphas_cluster.control_plane import free_port
from niphas_cluster.layout import GATEWAY
from niphas_cluster.node import Node
from niphas_common.bus.bus import Bus
from niphas_common.nix.runner import NixRunner
from niphas_schemas import BuildDone
from tests.cluster.pods import new_namespace
from tests.niphas_builder.conftest import BuildFlake, build_flake
from tests.niphas_builder.helpers import events, http_cache, running_builder
from tests.nix_harness import CacheKey
from tests.node_harness import Kubectl

pytestmark = [pytest.mark.root, pytest.mark.nix, pytest.mark.slow, pytest.mark.timeout(600)]
__all__ = ["build_flake"]  # the builder tests' fixture, used here too


async def test_a_job_pod_builds_and_only_the_builder_signs(
    real_node: Node,
    node_kubectl: Kubectl,
    niphas_image: str,
    bus: Bus,
    build_flake: Callable[..., BuildFlake],
    cache_key: CacheKey,
    nix_runner: NixRunner,
    tmp_path: Path,
) -> None:
    namespace = new_namespace(node_kubectl)
    node_kubectl("-n", namespace, "create", "serviceaccount", "niphas-build")
    flake = build_flake(sleep=1)
    cache = tmp_path / "cache"
    port = free_port()
    cache.mkdir()
    # Served at the host's address on the pod network, where build pods reach it.
    with http_cache(cache, GATEWAY) as read_url:
        settings = BuilderSettings(
            state_dir=tmp_path / "state",
            name="builder-node-test",
            cache_url=f"file://{cache}",
            cache_read_url=read_url,
            secret_key_file=cache_key.secret_file,
            executor="kubernetes",
            kubeconfig=real_node.kubeconfig,
            k8s_namespace=namespace,
            k8s_image=niphas_image,
            k8s_cpu_request="100m",
            k8s_memory_request="128Mi",
            staging_host=GATEWAY,
            staging_port=port,
            staging_url=f"http://{GATEWAY}:{port}",
        )
        async with running_builder(bus, settings):
            await bus.publish(flake.eval_done("app", "fail"))
            done: dict[str, BuildDone] = {}
            for _ in range(600):
                done = {e.attribute: e for e in await events(bus, BuildDone)}
                if {"app", "fail"} <= set(done):
                    break
                await asyncio.sleep(0.5)
    assert {"app", "fail"} <= set(done), f"build.done seen: {sorted(done)}"
    app, fail = done["app"], done["fail"]
    assert app.status == "built", app.log_tail
    assert fail.status == "failed"
    assert "boom: the build broke" in (fail.log_tail or "")

    # The outputs reach a stock client only through the cache, signed by the builder's key.
    [output] = app.outputs
    store = tmp_path / "client-store"
    nix_runner.run(
        "nix", "copy", "--from", f"file://{cache}", "--to", str(store), output.path,
        "--option", "trusted-public-keys", str(cache_key.public),
    )  # fmt: skip
    narinfo = (cache / f"{Path(output.path).name.split('-')[0]}.narinfo").read_text()
    assert f"Sig: {cache_key.public.name}:" in narinfo
    # The Job pods ran on the node and were cleaned up after their results were taken.
    left = node_kubectl("-n", namespace, "get", "jobs", "-o", "name").stdout.strip()
    assert left == ""
