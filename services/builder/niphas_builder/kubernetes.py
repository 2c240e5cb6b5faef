"""The Kubernetes executor: one `batch/v1` Job per derivation.

The Job is named after the derivation's hash (`niphas-build-<hash>`), so a builder restarted
mid-build adopts the Job already running instead of starting a second one. It is followed
through the shared list + watch (`niphas_common.kube`: the Job by name, relisted when the
watch's version expired) until a `Complete` or `Failed` condition, its pod's log is collected,
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

from niphas_common.errors import TransientError
from niphas_common.kube.client import Kube, KubeConflict, KubeError, collection_path, object_path
from niphas_common.kube.config import require
from niphas_common.kube.watch import LISTED, SYNCED, Selection, list_and_watch

from .build_pod import job_manifest, job_name
from .executor import BuildJob, LogSink, Outcome
from .settings import BuilderSettings
from .staging import StagingArea, UploadRefused

log = logging.getLogger(__name__)

FOLLOW_RESYNC_S = 300
"""Seconds between re-reads of a followed Job (a relist), however quiet its watch is."""

JOB_LOG_LINES = 100_000
"""Lines of a build pod's log collected (the log stream caps it in bytes, keeping its end)."""

__all__ = ["JobExecutor", "job_manifest", "job_name", "verdict"]


def verdict(job: dict[str, Any]) -> tuple[bool, str] | None:
    """(succeeded, reason) once the Job finished, from its conditions; None while it runs."""
    for cond in (job.get("status") or {}).get("conditions") or ():
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Complete":
            return True, ""
        if cond.get("type") == "Failed":
            reason = f"{cond.get('reason') or ''} {cond.get('message') or ''}".strip()
            return False, f"Job failed: {reason}"
    return None


class JobExecutor:
    pushes = True

    def __init__(
        self,
        kube: Kube,
        settings: BuilderSettings,
        staging: StagingArea,
        public_keys: list[str],
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.staging = staging
        self.public_keys = public_keys
        self.namespace = settings.k8s_namespace
        self._jobs = collection_path("batch/v1", "Job", self.namespace)

    @classmethod
    async def from_settings(
        cls, settings: BuilderSettings, staging: StagingArea, public_keys: list[str]
    ) -> JobExecutor:
        """The cluster of `settings.kubeconfig`, else `KUBECONFIG`, else in-cluster."""
        kube = await require(settings.kubeconfig, "niphas-builder")
        return cls(kube, settings, staging, public_keys)

    async def close(self) -> None:
        await self.kube.close()

    def manifest(self, job: BuildJob) -> dict[str, Any]:
        token = self.staging.token(job.drv_hash)
        return job_manifest(job, self.settings, self.staging.url(job), token, self.public_keys)

    async def realise(self, job: BuildJob, log: LogSink | None = None) -> Outcome:
        """Cancelled (the builder stopping), the Job keeps running for the next builder to
        adopt; `cancel` stops it."""
        name = job_name(job)
        await self.staging.prepare(job)
        # API errors are KubeErrors, TransientErrors already: the build is retried later.
        ok, reason = await self._run(job, name)
        logs = await self._logs(name)
        if log is not None:
            log(logs.encode())  # the pod's log, once it finished
        await self._delete(name)
        try:
            if ok:
                # Only verified outputs get signed; a refusal fails the build with its reason.
                await self.staging.publish(job)
        except UploadRefused as exc:
            ok, reason = False, f"outputs refused, nothing signed: {exc}"
        finally:
            self.staging.discard(job)
        return Outcome(ok, f"{logs}\n{reason}".strip(), f"job/{name}")

    async def cancel(self, job: BuildJob) -> None:
        """Stop `job`'s build (superseded): delete its Job, whose pod goes with it."""
        await self._delete(job_name(job))
        self.staging.discard(job)
        log.info("deleted Job %s/%s: build cancelled", self.namespace, job_name(job))

    async def _run(self, job: BuildJob, name: str) -> tuple[bool, str]:
        manifest = self.manifest(job)
        try:
            await self.kube.create(self._jobs, manifest)
            log.info("created Job %s/%s for %s", self.namespace, name, job.drv_path)
        except KubeConflict:
            current = await self.kube.get(self._job(name))
            annotations = ((current or {}).get("metadata") or {}).get("annotations") or {}
            staging = annotations.get("niphas.io/staging-url")
            if staging != self.staging.url(job):
                # Its pod uploads to a builder that is gone: start it again, uploading here.
                log.info("replacing Job %s/%s (it uploads to %s)", self.namespace, name, staging)
                await self._replace(name, manifest)
            else:
                log.info("adopted running Job %s/%s for %s", self.namespace, name, job.drv_path)
        return await self._follow(name)

    async def _replace(self, name: str, manifest: dict[str, Any]) -> None:
        await self._delete(name)
        for _ in range(600):
            try:
                await self.kube.create(self._jobs, manifest)
                return
            except KubeConflict:
                await asyncio.sleep(0.2)  # still being deleted
        raise TransientError(f"Job {name} was not deleted within 120 s")

    async def _follow(self, name: str) -> tuple[bool, str]:
        """List + watch the Job until it finishes."""
        selection = Selection(self._jobs, field_selector=f"metadata.name={name}")
        listed = False
        events = list_and_watch(self.kube, selection, resync_s=FOLLOW_RESYNC_S, retry=None)
        async for event in events:
            if (event.kind == SYNCED and not listed) or event.kind == "DELETED":
                raise TransientError(f"Job {name} was deleted before it finished")
            listed = event.kind == LISTED
            done = None if event.kind == SYNCED else verdict(event.obj)
            if done is not None:
                return done
        raise AssertionError("list_and_watch ends only with an error")

    async def _logs(self, name: str) -> str:
        pods, _ = await self.kube.list(
            collection_path("v1", "Pod", self.namespace), label_selector=f"job-name={name}"
        )
        if not pods:
            return f"(no pod of Job {name} left a log)"
        texts = []
        for pod in sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or ""):
            pod_name = pod["metadata"]["name"]
            path = f"{object_path('v1', 'Pod', self.namespace, pod_name)}/log"
            query = {"container": "build", "tailLines": str(JOB_LOG_LINES)}
            try:
                texts.append(await self.kube.text(path, query=query))
            except KubeError as exc:
                texts.append(f"(log of {pod_name} unavailable: {exc})")
        return "\n".join(texts)

    async def _delete(self, name: str) -> None:
        # Background: pods go with the Job through the garbage collector.
        await self.kube.delete(self._job(name))

    def _job(self, name: str) -> str:
        return object_path("batch/v1", "Job", self.namespace, name)
