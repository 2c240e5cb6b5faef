"""The build Job's manifest: a pod that builds untrusted code and holds nothing worth stealing.

- No key, no host store: the pod builds into its own ephemeral store (an emptyDir at
  `k8s_store_dir`, used as a chroot store), substituting the derivation and whatever the cache
  already has from `cache_read_url` (trusting only the cluster's public keys).
- Nix's sandbox is on (`sandbox = true`, `sandbox-fallback = false`): the build runs as a
  `nixbld` user in its own mount, PID, IPC, UTS and network namespaces (fixed-output
  derivations keep the network), seeing only its inputs. Setting those up needs
  CAP_SYS_ADMIN, `unshare`/`mount` allowed by seccomp and AppArmor, and mounting a fresh
  /proc, which the kernel refuses while the runtime masks paths under /proc. Hence
  `privileged: true` (the alternative, CAP_SYS_ADMIN with seccomp and AppArmor `Unconfined`
  and `procMount: Unmasked`, needs the ProcMountType feature gate).
- What it made leaves unsigned, uploaded with `nix copy` to the builder's staging endpoint
  (`staging.py`): the derivation closure (`.drv` files and sources, which it has from
  evaluating the flake or from the cache) and the outputs' closure. Only what the cache
  lacks travels. The builder verifies all of it by content and signs it. The upload token is
  in the container's environment but the script moves it into an unexported shell variable
  before any nix process starts, so no build (and no fixed-output `impureEnvVars`) can read
  it.
"""

from __future__ import annotations

from typing import Any

from .executor import BuildJob
from .settings import BuilderSettings

SCRIPT = """\
set -eu
# The upload token: a shell variable from here on, never in a building nix's environment.
token=$STAGING_TOKEN
unset STAGING_TOKEN
# --derivation: is the .drv itself in the cache (a .drv installable means its outputs).
if [ -n "$FLAKE_ATTR" ] \\
  && ! nix path-info --derivation --store "$CACHE_URL" "$DRV" >/dev/null 2>&1; then
  # The builder could not provide the .drv: evaluate the locked flake here, sandboxed.
  nix build --no-link --print-build-logs "$FLAKE_ATTR"
else
  nix-store --realise "$DRV"
fi
if ! nix-store --check-validity "$DRV" 2>/dev/null; then
  echo "niphas: evaluating $FLAKE_ATTR here did not give $DRV (another Nix version?)" >&2
  exit 1
fi
# What the builder may lack: the .drv files and sources, then the outputs and their closure.
nix copy --derivation --to "$STAGING_URL/$token?compression=zstd" "$DRV"
nix copy --to "$STAGING_URL/$token?compression=zstd" $OUTPUTS
"""


def job_name(job: BuildJob) -> str:
    return f"niphas-build-{job.drv_hash}"


def _label(value: str) -> str:
    """A label value: at most 63 characters, alphanumeric at both ends."""
    return value[:63].strip("-_.")


def nix_config(settings: BuilderSettings, public_keys: list[str]) -> str:
    """The pod's whole Nix configuration (NIX_CONFIG): its own store, the sandbox, the cache
    as the only substituter, trusted through the cluster's public keys."""
    return "\n".join(
        [
            "experimental-features = nix-command flakes",
            f"store = {settings.k8s_store_dir}",
            "sandbox = true",
            "sandbox-fallback = false",
            "build-users-group = nixbld",
            f"substituters = {settings.read_url}",
            f"trusted-public-keys = {' '.join(public_keys)}",
            "require-sigs = true",
            "narinfo-cache-negative-ttl = 0",
        ]
    )


def pod_environment(
    job: BuildJob, settings: BuilderSettings, staging_url: str, token: str, keys: list[str]
) -> dict[str, str]:
    """The build container's environment: what to build, where to upload, no secret but the
    job's own upload token."""
    return {
        "DRV": job.drv_path,
        "FLAKE_ATTR": f"{job.locked_flake_ref}#{job.attr_path}" if job.locked_flake_ref else "",
        "OUTPUTS": " ".join(sorted(job.outputs.values())),
        "CACHE_URL": settings.read_url,
        "STAGING_URL": staging_url,
        "STAGING_TOKEN": token,
        "NIX_CONFIG": nix_config(settings, keys),
    }


def labels_of(job: BuildJob) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "niphas-build",
        "app.kubernetes.io/managed-by": "niphas-builder",
        "niphas.io/drv-hash": job.drv_hash,
        "niphas.io/commit": _label(job.commit),
        "niphas.io/attribute": _label(job.attribute),
    }


def job_manifest(
    job: BuildJob, settings: BuilderSettings, staging_url: str, token: str, keys: list[str]
) -> dict[str, Any]:
    labels = labels_of(job)
    annotations = {
        "niphas.io/drv-path": job.drv_path,
        "niphas.io/commit": job.commit,
        "niphas.io/repository": job.repository,
        "niphas.io/attribute": job.attribute,
        "niphas.io/staging-url": staging_url,
    }
    env = pod_environment(job, settings, staging_url, token, keys)
    container = {
        "name": "build",
        "image": settings.k8s_image,
        "command": [settings.k8s_shell, "-c", SCRIPT],
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "resources": {
            "requests": {"cpu": settings.k8s_cpu_request, "memory": settings.k8s_memory_request},
            "limits": {"cpu": settings.k8s_cpu_limit, "memory": settings.k8s_memory_limit},
        },
        # For Nix's sandbox (namespaces, mounts, a fresh /proc); see the module docstring.
        "securityContext": {"privileged": True, "runAsUser": 0},
        "volumeMounts": [{"name": "store", "mountPath": settings.k8s_store_dir}],
    }
    pod = {
        "metadata": {"labels": labels, "annotations": annotations},
        "spec": {
            "restartPolicy": "Never",
            "serviceAccountName": settings.k8s_service_account,
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,  # no other services' addresses in its environment
            "containers": [container],
            "volumes": [{"name": "store", "emptyDir": {}}],
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
