"""Which cluster, if any: a kubeconfig (setting, then KUBECONFIG), else the in-cluster
service account, else none (render mode)."""

from __future__ import annotations

import os
from pathlib import Path

from kubernetes_asyncio import config
from kubernetes_asyncio.client import ApiClient, Configuration


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
        await config.load_kube_config(config_file=str(path), client_configuration=conf)
    elif in_cluster():
        config.load_incluster_config(client_configuration=conf)  # type: ignore[no-untyped-call]
    else:
        return None
    return ApiClient(conf)
