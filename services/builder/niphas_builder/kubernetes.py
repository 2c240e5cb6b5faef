"""The Kubernetes executor: one `batch/v1` Job per derivation.

The Job is named after the derivation's hash (`niphas-build-<hash>`), so a builder restarted
mid-build adopts the Job already running instead of starting a second one. It is followed
through the API's watch until a `Complete` or `Failed` condition, its pod's log is collected,
and it is deleted (`ttlSecondsAfterFinished` cleans up after a builder that died first).

The build pod (`build_pod.job_manifest`) holds no key and no host store: it builds in its own
store with Nix's sandbox on and uploads its unsigned outputs to this builder's staging
endpoint. Once the Job completed, the builder verifies the uploads, signs them and pushes them
to the cache (`staging.StagingArea.publish`); uploads that do not check out fail the build.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from niphas_common.errors import TransientError

from .build_pod import job_manifest, job_name
from .executor import BuildJob, Outcome
from .settings import BuilderSettings
from .staging import StagingArea, UploadRefused

log = logging.getLogger(__name__)

WATCH_TIMEOUT_S = 300
"""Seconds one watch request lasts before it is renewed (servers cap watches anyway)."""

__all__ = ["JobExecutor", "job_manifest", "job_name", "verdict"]


def verdict(job: Any) -> tuple[bool, str] | None:
    """(succeeded, reason) once the Job finished, from its conditions; None while it runs."""
    status = getattr(job, "status", None)
    for cond in getattr(status, "conditions", None) or ():
        if cond.status != "True":
            continue
        if cond.type == "Complete":
            return True, ""
        if cond.type == "Failed":
            return False, f"Job failed: {cond.reason or ''} {cond.message or ''}".strip()
    return None


class JobExecutor:
    pushes = True

    def __init__(
        self,
        api: client.ApiClient,
        settings: BuilderSettings,
        staging: StagingArea,
        public_keys: list[str],
    ) -> None:
        self.api = api
        self.settings = settings
        self.staging = staging
        self.public_keys = public_keys
        self.batch = client.BatchV1Api(api)
        self.core = client.CoreV1Api(api)
        self.namespace = settings.k8s_namespace

    @classmethod
    async def from_settings(
        cls, settings: BuilderSettings, staging: StagingArea, public_keys: list[str]
    ) -> JobExecutor:
        conf = client.Configuration()
        if settings.kubeconfig is None:
            config.load_incluster_config(client_configuration=conf)  # type: ignore[no-untyped-call]
        else:
            await config.load_kube_config(
                config_file=str(settings.kubeconfig), client_configuration=conf
            )
        return cls(client.ApiClient(conf), settings, staging, public_keys)

    async def close(self) -> None:
        await self.api.close()

    def manifest(self, job: BuildJob) -> dict[str, Any]:
        token = self.staging.token(job.drv_hash)
        return job_manifest(job, self.settings, self.staging.url(job), token, self.public_keys)

    async def realise(self, job: BuildJob) -> Outcome:
        name = job_name(job)
        await self.staging.prepare(job)
        try:
            ok, reason = await self._run(job, name)
            logs = await self._logs(name)
            await self._delete(name)
        except ApiException as exc:
            raise TransientError(f"Kubernetes API: {exc.status} {exc.reason}") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransientError(f"Kubernetes API unreachable: {exc!r}") from exc
        try:
            if ok:
                # Only verified outputs get signed; a refusal fails the build with its reason.
                await self.staging.publish(job)
        except UploadRefused as exc:
            ok, reason = False, f"outputs refused, nothing signed: {exc}"
        finally:
            self.staging.discard(job)
        return Outcome(ok, f"{logs}\n{reason}".strip(), f"job/{name}")

    async def _run(self, job: BuildJob, name: str) -> tuple[bool, str]:
        manifest = self.manifest(job)
        try:
            created = await self.batch.create_namespaced_job(self.namespace, manifest)  # type: ignore[arg-type]  # a dict serialises as is
            log.info("created Job %s/%s for %s", self.namespace, name, job.drv_path)
        except ApiException as exc:
            if exc.status != 409:
                raise
            created = await self.batch.read_namespaced_job(name, self.namespace)
            staging = (created.metadata.annotations or {}).get("niphas.io/staging-url")
            if staging != self.staging.url(job):
                # Its pod uploads to a builder that is gone: start it again, uploading here.
                log.info("replacing Job %s/%s (it uploads to %s)", self.namespace, name, staging)
                created = await self._replace(name, manifest)
            else:
                log.info("adopted running Job %s/%s for %s", self.namespace, name, job.drv_path)
        return await self._follow(name, created)

    async def _replace(self, name: str, manifest: dict[str, Any]) -> Any:
        await self._delete(name)
        for _ in range(600):
            try:
                return await self.batch.create_namespaced_job(self.namespace, manifest)  # type: ignore[arg-type]
            except ApiException as exc:
                if exc.status != 409:
                    raise
            await asyncio.sleep(0.2)  # still being deleted
        raise TransientError(f"Job {name} was not deleted within 120 s")

    async def _follow(self, name: str, current: Any) -> tuple[bool, str]:
        """Watch the Job from the version we hold until it finishes."""
        while True:
            done = verdict(current)
            if done is not None:
                return done
            version = current.metadata.resource_version
            stream = watch.Watch()
            try:
                async for event in stream.stream(
                    self.batch.list_namespaced_job,
                    self.namespace,
                    field_selector=f"metadata.name={name}",
                    resource_version=version,
                    timeout_seconds=WATCH_TIMEOUT_S,
                ):
                    if event["type"] == "DELETED":
                        raise TransientError(f"Job {name} was deleted before it finished")
                    if event["type"] in ("ADDED", "MODIFIED"):
                        current = event["object"]
                        if verdict(current) is not None:
                            break
            except ApiException as exc:
                if exc.status != 410:
                    raise
            finally:
                await stream.close()
            if verdict(current) is None:
                # The watch ended or the version expired: re-read, then watch again.
                current = await self.batch.read_namespaced_job(name, self.namespace)

    async def _logs(self, name: str) -> str:
        pods = await self.core.list_namespaced_pod(
            self.namespace, label_selector=f"job-name={name}"
        )
        if not pods.items:
            return f"(no pod of Job {name} left a log)"
        texts = []
        for pod in sorted(pods.items, key=lambda p: p.metadata.creation_timestamp or 0):
            try:
                text = await self.core.read_namespaced_pod_log(
                    pod.metadata.name,
                    self.namespace,
                    container="build",
                    tail_lines=self.settings.log_tail_lines,
                )
            except ApiException as exc:
                text = f"(log of {pod.metadata.name} unavailable: {exc.status} {exc.reason})"
            texts.append(str(text))
        return "\n".join(texts)

    async def _delete(self, name: str) -> None:
        try:
            # Background: pods go with the Job through the garbage collector.
            await self.batch.delete_namespaced_job(
                name, self.namespace, propagation_policy="Background"
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
