"""The Kubernetes executor: one `batch/v1` Job per derivation.

The Job is named after the derivation's hash (`niphas-build-<hash>`), so a builder restarted
mid-build adopts the Job already running instead of starting a second one. It is followed
through the API's watch until a `Complete` or `Failed` condition, its pod's log is collected,
and it is deleted (`ttlSecondsAfterFinished` cleans up after a builder that died first).

The build pod (see `job_manifest`) runs the Nix image's `nix` against the node's store,
mounted from the host at /host (a chroot store, `--store /host`): it realises the `.drv` when
the node has it, else builds the locked flake attribute, then pushes the closure to the cache
signed with the key from a Secret. The pod is the isolation boundary (Nix's sandbox is off).
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from niphas_common.errors import TransientError

from .cache import with_params
from .executor import BuildJob, Outcome
from .settings import BuilderSettings

log = logging.getLogger(__name__)

KEY_DIR = "/etc/niphas/cache-key"
HOST_ROOT = "/host"
WATCH_TIMEOUT_S = 300
"""Seconds one watch request lasts before it is renewed (servers cap watches anyway)."""

_SCRIPT = """\
set -eu
if [ -e "$HOST_ROOT$DRV" ]; then
  nix-store --store "$HOST_ROOT" --realise "$DRV"
else
  nix build --store "$HOST_ROOT" --no-link --print-build-logs "$FLAKE_ATTR"
fi
nix copy --store "$HOST_ROOT" --to "$CACHE_URL" $OUTPUTS
"""


def job_name(job: BuildJob) -> str:
    return f"niphas-build-{job.drv_hash}"


def _label(value: str) -> str:
    """A label value: at most 63 characters, alphanumeric at both ends."""
    return value[:63].strip("-_.")


def job_manifest(job: BuildJob, settings: BuilderSettings) -> dict[str, Any]:
    labels = {
        "app.kubernetes.io/name": "niphas-build",
        "app.kubernetes.io/managed-by": "niphas-builder",
        "niphas.io/drv-hash": job.drv_hash,
        "niphas.io/commit": _label(job.commit),
        "niphas.io/attribute": _label(job.attribute),
    }
    annotations = {
        "niphas.io/drv-path": job.drv_path,
        "niphas.io/commit": job.commit,
        "niphas.io/repository": job.repository,
        "niphas.io/attribute": job.attribute,
    }
    flake_attr = f"{job.locked_flake_ref}#{job.attr_path}" if job.locked_flake_ref else ""
    cache = with_params(
        settings.push_url,
        compression=settings.compression,
        secret_key=f"{KEY_DIR}/secret-key",
    )
    env = {
        "DRV": job.drv_path,
        "FLAKE_ATTR": flake_attr,
        "OUTPUTS": " ".join(sorted(job.outputs.values())),
        "CACHE_URL": cache,
        "HOST_ROOT": HOST_ROOT,
        "NIX_CONFIG": "experimental-features = nix-command flakes\nsandbox = false",
    }
    resources = {
        "requests": {"cpu": settings.k8s_cpu_request, "memory": settings.k8s_memory_request},
        "limits": {"cpu": settings.k8s_cpu_limit, "memory": settings.k8s_memory_limit},
    }
    pod = {
        "metadata": {"labels": labels, "annotations": annotations},
        "spec": {
            "restartPolicy": "Never",
            "serviceAccountName": settings.k8s_service_account,
            "automountServiceAccountToken": False,
            "containers": [
                {
                    "name": "build",
                    "image": settings.k8s_image,
                    "command": ["/bin/sh", "-c", _SCRIPT],
                    "env": [{"name": k, "value": v} for k, v in env.items()],
                    "resources": resources,
                    "volumeMounts": [
                        {"name": "nix", "mountPath": f"{HOST_ROOT}/nix"},
                        {"name": "cache-key", "mountPath": KEY_DIR, "readOnly": True},
                    ],
                }
            ],
            "volumes": [
                {
                    "name": "nix",
                    "hostPath": {"path": settings.k8s_host_nix_dir, "type": "Directory"},
                },
                {
                    "name": "cache-key",
                    "secret": {"secretName": settings.k8s_key_secret, "defaultMode": 0o400},
                },
            ],
        },
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(job),
            "namespace": settings.k8s_namespace,
            "labels": labels,
            "annotations": annotations,
        },
        "spec": {
            "backoffLimit": settings.k8s_backoff_limit,
            "activeDeadlineSeconds": max(1, int(settings.build_timeout_s)),
            "ttlSecondsAfterFinished": settings.k8s_ttl_after_finished_s,
            "template": pod,
        },
    }


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

    def __init__(self, api: client.ApiClient, settings: BuilderSettings) -> None:
        self.api = api
        self.settings = settings
        self.batch = client.BatchV1Api(api)
        self.core = client.CoreV1Api(api)
        self.namespace = settings.k8s_namespace

    @classmethod
    async def from_settings(cls, settings: BuilderSettings) -> JobExecutor:
        conf = client.Configuration()
        if settings.kubeconfig is None:
            config.load_incluster_config(client_configuration=conf)  # type: ignore[no-untyped-call]
        else:
            await config.load_kube_config(
                config_file=str(settings.kubeconfig), client_configuration=conf
            )
        return cls(client.ApiClient(conf), settings)

    async def close(self) -> None:
        await self.api.close()

    async def realise(self, job: BuildJob) -> Outcome:
        name = job_name(job)
        try:
            ok, reason = await self._run(job, name)
            logs = await self._logs(name)
            await self._delete(name)
        except ApiException as exc:
            raise TransientError(f"Kubernetes API: {exc.status} {exc.reason}") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TransientError(f"Kubernetes API unreachable: {exc!r}") from exc
        return Outcome(ok, f"{logs}\n{reason}".strip(), f"job/{name}")

    async def _run(self, job: BuildJob, name: str) -> tuple[bool, str]:
        try:
            created = await self.batch.create_namespaced_job(
                self.namespace,
                job_manifest(job, self.settings),  # type: ignore[arg-type]  # a dict serialises as is
            )
            log.info("created Job %s/%s for %s", self.namespace, name, job.drv_path)
        except ApiException as exc:
            if exc.status != 409:
                raise
            created = await self.batch.read_namespaced_job(name, self.namespace)
            log.info("adopted running Job %s/%s for %s", self.namespace, name, job.drv_path)
        return await self._follow(name, created)

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
