"""Which cluster, if any: an explicit kubeconfig file (a setting or a command's option), else
the first file of `KUBECONFIG`, else the in-cluster service account, else none.

Services that can run without a cluster (the operator renders files instead) take None as
that answer; services that cannot (the builder's Job executor) say so with `NoCluster`."""

from __future__ import annotations

import os
from pathlib import Path

from kubernetes_asyncio import config
from kubernetes_asyncio.client import ApiClient, Configuration

from niphas_common.kube.client import Kube, RequestCounter


class NoCluster(RuntimeError):
    """No kubeconfig, no KUBECONFIG and not running in a pod: no cluster to talk to."""


def kubeconfig_path(explicit: Path | None) -> Path | None:
    if explicit is not None:
        return explicit
    env = os.environ.get("KUBECONFIG")
    return Path(env.split(os.pathsep)[0]) if env else None


def in_cluster() -> bool:
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


async def api_client(kubeconfig: Path | None) -> ApiClient | None:
    """A client for the configured cluster, or None when no cluster is configured."""
    conf = Configuration()
    path = kubeconfig_path(kubeconfig)
    if path is not None:
        if not path.is_file():
            raise NoCluster(f"kubeconfig {path}: no such file")
        try:
            await config.load_kube_config(config_file=str(path), client_configuration=conf)
        except Exception as exc:  # the library fails on a malformed file in many ways
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise NoCluster(
                f"kubeconfig {path} is not usable: {exc.__class__.__name__}: {detail}"
            ) from None
    elif in_cluster():
        config.load_incluster_config(client_configuration=conf)  # type: ignore[no-untyped-call]
    else:
        return None
    return ApiClient(conf)


async def connect(
    kubeconfig: Path | None,
    field_manager: str,
    *,
    count: RequestCounter | None = None,
    compressed: bool = True,
) -> Kube | None:
    """A `Kube` for the configured cluster (the caller closes it), or None without one."""
    api = await api_client(kubeconfig)
    if api is None:
        return None
    return Kube(api, field_manager, count=count, compressed=compressed)


async def require(
    kubeconfig: Path | None, field_manager: str, *, count: RequestCounter | None = None
) -> Kube:
    """`connect`, for a service that cannot work without a cluster."""
    kube = await connect(kubeconfig, field_manager, count=count)
    if kube is None:
        raise NoCluster(
            "no cluster configured: set a kubeconfig, KUBECONFIG, or run in a pod "
            "(KUBERNETES_SERVICE_HOST)"
        )
    return kube
