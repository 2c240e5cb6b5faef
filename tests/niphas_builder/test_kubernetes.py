"""The Kubernetes Job executor against a real kube-apiserver. No kubelet or Job controller
runs there, so the test plays the controller: it writes the Job's status conditions through
the API. Covered: the Job's spec is what a cluster needs (labels linking it to the derivation
and commit, resources, deadline, backoff, TTL, the node's store and the signing key mounted,
no Secret and no hostPath anywhere, Nix's sandbox on, uploads to the staging endpoint),
success and failure are followed through the watch, the Job is deleted after, and the
executor finds its cluster through KUBECONFIG when no kubeconfig is set. The staging
step itself is `test_staging.py`; here it is a stand-in that accepts every Job."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from niphas_builder.cache import BuildCache
from niphas_builder.executor import BuildJob, Outcome
from niphas_builder.kubernetes import JobExecutor, job_name
from niphas_builder.settings import BuilderSettings
from niphas_builder.staging import StagingArea
from niphas_common.kube.client import Kube
from niphas_common.nix.runner import NixRunner
from niphas_common.nix.signing import SecretKey, TrustedKeys
from tests.kube_harness import KubeApiServer

pytestmark = [pytest.mark.slow]

DRV = "/nix/store/0c6kzph7l9cb9dbmxgjmjg6pq4xhm2ka-hello-web.drv"
OUT = "/nix/store/0c6kzph7l9cb9dbmxgjmjg6pq4xhm2kb-hello-web"
COMMIT = "c0ffee" + "0" * 34
KEY = SecretKey.generate("niphas-test-1")
STAGING = "http://10.0.0.7:8090"


def make_job(drv: str = DRV) -> BuildJob:
    return BuildJob(
        drv_path=drv,
        outputs={"out": OUT},
        attribute="hello-web",
        repository="https://forge.example/org/app.git",
        commit=COMMIT,
        locked_flake_ref="github:org/app/" + COMMIT,
        attr_path="packages.x86_64-linux.hello-web",
    )


@pytest.fixture
def settings(kube_namespace: str) -> BuilderSettings:
    return BuilderSettings(
        k8s_namespace=kube_namespace,
        cache_url="s3://niphas-cache?region=eu-west-1",
        build_timeout_s=1800,
        k8s_ttl_after_finished_s=600,
        k8s_backoff_limit=0,
    )


@pytest.fixture
async def batch(kube_apiserver: KubeApiServer) -> AsyncIterator[client.BatchV1Api]:
    async with kube_apiserver.api_client() as api:
        yield client.BatchV1Api(api)


class AcceptingStaging(StagingArea):
    """The staging area with nothing to verify: these tests are about the Job."""

    def __init__(self, root: Path) -> None:
        super().__init__(
            root, KEY, NixRunner(), BuildCache(
                NixRunner(), push_url=f"file://{root}/cache", read_url=f"file://{root}/cache",
                key_file=root / "unused", trusted=TrustedKeys([KEY.public_key]),
            ), base_url=STAGING,
            compression="zstd", key_file=root / "unused",
        )  # fmt: skip

    async def prepare(self, job: BuildJob) -> None:
        pass

    async def publish(self, job: BuildJob) -> list[str]:
        return []


@pytest.fixture
async def executor(
    kube_apiserver: KubeApiServer, settings: BuilderSettings, tmp_path: Path
) -> AsyncIterator[JobExecutor]:
    staging = AcceptingStaging(tmp_path)
    kube = Kube(kube_apiserver.api_client(), "niphas-builder-test")
    ex = JobExecutor(kube, settings, staging, [str(KEY.public_key)])
    try:
        yield ex
    finally:
        await ex.close()


async def created_job(batch: client.BatchV1Api, namespace: str, name: str) -> Any:
    for _ in range(200):
        try:
            return await batch.read_namespaced_job(name, namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
        await asyncio.sleep(0.05)
    raise AssertionError(f"Job {name} was never created")


async def finish(batch: client.BatchV1Api, namespace: str, name: str, condition: str) -> None:
    """What the Job controller would write when the pod ends."""
    status: dict[str, Any] = {
        "conditions": [
            {
                "type": condition,
                "status": "True",
                "reason": "BackoffLimitExceeded" if condition == "Failed" else None,
                "message": "Job has reached the specified backoff limit"
                if condition == "Failed"
                else None,
            }
        ],
        ("succeeded" if condition == "Complete" else "failed"): 1,
    }
    await batch.patch_namespaced_job_status(
        name,
        namespace,
        {"status": status},
        _content_type="application/merge-patch+json",  # type: ignore[call-arg]  # in **kwargs
    )


async def gone(batch: client.BatchV1Api, namespace: str, name: str) -> bool:
    try:
        await batch.read_namespaced_job(name, namespace)
    except ApiException as exc:
        return exc.status == 404
    return False


async def test_job_spec_and_success_followed_then_deleted(
    executor: JobExecutor, batch: client.BatchV1Api, settings: BuilderSettings
) -> None:
    ns, job = settings.k8s_namespace, make_job()
    name = job_name(job)
    task = asyncio.create_task(executor.realise(job))
    created = await created_job(batch, ns, name)

    labels = created.metadata.labels
    assert labels["niphas.io/drv-hash"] == "0c6kzph7l9cb9dbmxgjmjg6pq4xhm2ka"
    assert labels["niphas.io/commit"] == COMMIT
    assert created.metadata.annotations["niphas.io/drv-path"] == DRV
    spec = created.spec
    assert spec.backoff_limit == 0
    assert spec.active_deadline_seconds == 1800
    # Sent, but this 1.20 server drops it (alpha behind a feature gate there; GA since 1.23).
    assert executor.manifest(job)["spec"]["ttlSecondsAfterFinished"] == 600
    pod = spec.template.spec
    assert pod.restart_policy == "Never"
    assert pod.automount_service_account_token is False
    [container] = pod.containers
    assert container.resources.requests == {"cpu": "500m", "memory": "512Mi"}
    assert container.resources.limits == {"cpu": "2", "memory": "4Gi"}
    env = {e.name: e.value for e in container.env}
    assert env["DRV"] == DRV and env["OUTPUTS"] == OUT
    assert env["FLAKE_ATTR"] == f"github:org/app/{COMMIT}#packages.x86_64-linux.hello-web"
    assert env["STAGING_URL"] == f"{STAGING}/staging/0c6kzph7l9cb9dbmxgjmjg6pq4xhm2ka"
    assert env["STAGING_TOKEN"] == executor.staging.token("0c6kzph7l9cb9dbmxgjmjg6pq4xhm2ka")
    nix_conf = dict(line.split(" = ", 1) for line in env["NIX_CONFIG"].splitlines())
    assert nix_conf["sandbox"] == "true" and nix_conf["sandbox-fallback"] == "false"
    assert nix_conf["store"] == "/niphas-store"
    assert nix_conf["trusted-public-keys"] == str(KEY.public_key)
    assert "secret-key" not in str(env) and str(KEY) not in str(created.to_dict())
    assert container.security_context.privileged is True  # for the sandbox's namespaces
    # No key, no host store: only the pod's own, ephemeral store.
    [volume] = pod.volumes
    assert volume.empty_dir is not None and volume.host_path is None and volume.secret is None
    assert [(m.name, m.mount_path) for m in container.volume_mounts] == [("store", "/niphas-store")]
    # The server adds job-name (what the log collection selects pods by).
    assert spec.template.metadata.labels.items() >= labels.items()
    assert spec.template.metadata.labels["job-name"] == name

    await asyncio.sleep(0.3)
    assert not task.done()  # still following: no condition yet
    await finish(batch, ns, name, "Complete")
    outcome: Outcome = await asyncio.wait_for(task, 30)
    assert outcome.succeeded and outcome.built_on == f"job/{name}"
    assert await gone(batch, ns, name)


async def test_failed_job_is_reported_with_reason_and_deleted(
    executor: JobExecutor, batch: client.BatchV1Api, settings: BuilderSettings
) -> None:
    ns, job = settings.k8s_namespace, make_job(DRV.replace("0c6k", "1c6k"))
    name = job_name(job)
    task = asyncio.create_task(executor.realise(job))
    await created_job(batch, ns, name)
    await finish(batch, ns, name, "Failed")
    outcome = await asyncio.wait_for(task, 30)
    assert not outcome.succeeded
    assert "BackoffLimitExceeded" in outcome.log
    assert await gone(batch, ns, name)


async def test_restarted_builder_adopts_the_running_job(
    executor: JobExecutor, batch: client.BatchV1Api, settings: BuilderSettings
) -> None:
    ns, job = settings.k8s_namespace, make_job(DRV.replace("0c6k", "2c6k"))
    name = job_name(job)
    first = asyncio.create_task(executor.realise(job))
    await created_job(batch, ns, name)
    first.cancel()  # the builder died while following
    with pytest.raises(asyncio.CancelledError):
        await first
    second = asyncio.create_task(executor.realise(job))
    await asyncio.sleep(0.3)
    jobs = await batch.list_namespaced_job(ns, label_selector="niphas.io/drv-hash")
    assert [j.metadata.name for j in jobs.items].count(name) == 1
    await finish(batch, ns, name, "Complete")
    assert (await asyncio.wait_for(second, 30)).succeeded
    assert await gone(batch, ns, name)


async def test_a_cancelled_build_deletes_its_job(
    executor: JobExecutor, batch: client.BatchV1Api, settings: BuilderSettings
) -> None:
    """Superseded: the builder cancels the call, then the build itself (its Job and pod)."""
    ns, job = settings.k8s_namespace, make_job(DRV.replace("0c6k", "3c6k"))
    name = job_name(job)
    task = asyncio.create_task(executor.realise(job))
    await created_job(batch, ns, name)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await executor.cancel(job)
    assert await gone(batch, ns, name)


async def test_the_cluster_comes_from_kubeconfig_when_none_is_set(
    kube_apiserver: KubeApiServer,
    settings: BuilderSettings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(kube_apiserver.kubeconfig))
    assert settings.kubeconfig is None
    staging = AcceptingStaging(tmp_path)
    executor = await JobExecutor.from_settings(settings, staging, [str(KEY.public_key)])
    try:
        jobs, _ = await executor.kube.list(
            f"/apis/batch/v1/namespaces/{settings.k8s_namespace}/jobs"
        )
        assert isinstance(jobs, list)
    finally:
        await executor.close()
