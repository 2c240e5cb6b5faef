"""The build pod's script, run for real before it ever meets a kubelet: with exactly the
environment the Job manifest gives the container, in a plain local shell, against a fresh
temporary store standing in for the pod's emptyDir. It substitutes the derivation from the
cache (pushed there by the builder), builds it with Nix's sandbox on, uploads the outputs to
the test's staging endpoint, and the builder's signing step makes them substitutable."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from niphas_builder.build_pod import job_manifest
from niphas_builder.executor import BuildJob
from niphas_builder.settings import BuilderSettings
from niphas_common.nix.runner import NixRunner
from tests.nix_harness import CacheKey

from .conftest import BuildFlake, Staging, build_job

pytestmark = [pytest.mark.nix]


def run_pod(manifest: dict[str, object], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """The container's command with the container's environment (plus a PATH and HOME,
    which the image provides)."""
    [container] = manifest["spec"]["template"]["spec"]["containers"]  # type: ignore[index]
    env = {e["name"]: e["value"] for e in container["env"]}
    env |= {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "pod-home")}
    return subprocess.run(
        container["command"], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def pod_settings(staging: Staging, tmp_path: Path) -> BuilderSettings:
    return BuilderSettings(
        cache_url=f"file://{staging.cache_dir}", k8s_store_dir=str(tmp_path / "pod-store")
    )


def manifest_for(
    job: BuildJob, staging: Staging, tmp_path: Path, cache_key: CacheKey
) -> dict[str, object]:
    settings = pod_settings(staging, tmp_path)
    token = staging.area.token(job.drv_hash)
    return job_manifest(job, settings, staging.area.url(job), token, [str(cache_key.public)])


async def test_pod_script_builds_sandboxed_in_its_own_store_and_uploads_for_signing(
    staging: Staging,
    build_flake: Callable[..., BuildFlake],
    cache_key: CacheKey,
    nix_runner: NixRunner,
    tmp_path: Path,
) -> None:
    job = build_job(build_flake(), "app")
    [app] = job.outputs.values()
    await staging.area.prepare(job)
    manifest = manifest_for(job, staging, tmp_path, cache_key)
    spec = manifest["spec"]["template"]["spec"]  # type: ignore[index]
    assert all("secret" not in v and "hostPath" not in v for v in spec["volumes"])

    # In a thread: the staging endpoint it uploads to runs on this event loop.
    done = await asyncio.to_thread(run_pod, manifest, tmp_path)
    assert done.returncode == 0, done.stderr
    # Built in the pod's own store, not the host's.
    assert (tmp_path / "pod-store" / app.removeprefix("/")).is_dir()
    assert not Path(app).exists()
    published = await staging.area.publish(job)
    assert app in published
    nix_runner.run(
        "nix", "copy", "--from", f"file://{staging.cache_dir}", "--to", str(tmp_path / "node"),
        app, "--option", "trusted-public-keys", str(cache_key.public),
    )  # fmt: skip
    assert (tmp_path / "node" / app.removeprefix("/") / "bin" / "app").exists()


async def test_pod_of_a_builder_without_the_drv_uploads_drvs_and_sources_all_verified(
    blind_staging: Staging,
    build_flake: Callable[..., BuildFlake],
    cache_key: CacheKey,
    nix_runner: NixRunner,
    tmp_path: Path,
) -> None:
    """As in a cluster: the builder's store lacks the `.drv` (the eval worker made it), so the
    pod evaluates the locked flake and uploads the derivation closure, the dependency (lib)
    and the flake input's source (busybox) besides the app; all vouched for by content."""
    staging, flake = blind_staging, build_flake()
    job = build_job(flake, "app")
    [app], lib = job.outputs.values(), flake.attribute("lib")
    await staging.area.prepare(job)
    assert staging.area.known_outputs(job.drv_hash) is None  # the builder has no .drv

    done = await asyncio.to_thread(
        run_pod, manifest_for(job, staging, tmp_path, cache_key), tmp_path
    )
    assert done.returncode == 0, done.stderr
    published = await staging.area.publish(job)
    [source] = [p for p in published if p.endswith("-source")]
    assert {app, lib.outputs["out"], job.drv_path, lib.drv_path, source} == set(published)
    for path in published:  # signed with the cluster key
        info = await staging.cache.client.narinfo(path)
        assert info is not None and len(info.sigs) == 1, path

    trust = ["--option", "trusted-public-keys", str(cache_key.public)]
    node = str(tmp_path / "node")
    nix_runner.run(
        "nix", "copy", "--from", f"file://{staging.cache_dir}", "--to", node, app, *trust
    )
    assert (tmp_path / "node" / app.removeprefix("/") / "bin" / "app").exists()
    nix_runner.run(
        "nix", "copy", "--derivation", "--from", f"file://{staging.cache_dir}",
        "--to", node, job.drv_path, *trust,
    )  # fmt: skip
    assert (tmp_path / "node" / job.drv_path.removeprefix("/")).is_file()
