"""`niphas rollback NAME [--to N]`: pin a workload to a store path from its history.

Rolling back is one merge patch of `spec.storePath`: the closure was built before, so the
operator re-applies the Deployment with it at once, with no evaluation, build or event.
Without `--to`, the entry before the one running now is chosen. `kubectl patch nw NAME
--type merge -p '{"spec":{"storePath":null}}'` (or `niphas rollback NAME --unpin`) unpins (the
workload follows builds again).

With no cluster configured (render mode) the pin lives in the renderer's state file (the
workload file is the user's) and the manifests are rendered again at once.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from niphas_operator.children import PodSettings
from niphas_operator.cluster import api_client
from niphas_operator.kube import Kube, KubeError, workload_path
from niphas_operator.render import Renderer
from niphas_operator.settings import OperatorSettings
from niphas_operator.workload import HistoryEntry, Workload


class RollbackError(Exception):
    """Nothing to roll back to, or no such workload or revision."""


def choose(workload: Workload, to: int | None) -> HistoryEntry:
    history = workload.status.history
    if to is not None:
        for entry in history:
            if entry.revision == to:
                return entry
        known = ", ".join(str(h.revision) for h in history) or "none"
        raise RollbackError(f"{workload.name} has no revision {to} (history: {known})")
    running = workload.spec.store_path or workload.status.store_path
    for i, entry in enumerate(history):
        if entry.store_path == running and i + 1 < len(history):
            return history[i + 1]
    raise RollbackError(f"{workload.name} has no earlier store path in its history")


async def rollback(kube: Kube, namespace: str, name: str, to: int | None) -> HistoryEntry:
    path = workload_path(namespace, name)
    obj = await kube.get(path)
    if obj is None:
        raise RollbackError(f"no NiphasWorkload {namespace}/{name}")
    workload = Workload(obj)
    entry = choose(workload, to)
    await kube.merge_patch(
        path,
        {
            "metadata": {"resourceVersion": workload.resource_version},
            "spec": {"storePath": entry.store_path},
        },
    )
    return entry


async def unpin(kube: Kube, namespace: str, name: str) -> None:
    await kube.merge_patch(workload_path(namespace, name), {"spec": {"storePath": None}})


async def _no_publish(event: object) -> None:
    """The rollback command renders pinned workloads only; it never asks for builds."""


async def render_rollback(
    settings: OperatorSettings, namespace: str, name: str, to: int | None, unpinning: bool
) -> HistoryEntry | None:
    key, _, value = settings.store_node_label.partition("=")
    pod = PodSettings(settings.stub_image, settings.csi_driver, (key, value))
    renderer = Renderer(
        settings.resolved_workloads_dir(), settings.resolved_render_dir(), pod, _no_publish
    )
    try:
        workload = renderer.find(namespace, name)
    except LookupError as exc:
        raise RollbackError(str(exc)) from None
    entry = None if unpinning else choose(workload, to)
    renderer.pin(namespace, name, entry.store_path if entry else None)
    await renderer.render_all()
    return entry


async def _run(
    kubeconfig: Path | None, namespace: str, name: str, to: int | None, unpinning: bool
) -> HistoryEntry | None:
    settings = OperatorSettings()
    client = await api_client(kubeconfig or settings.kubeconfig)
    if client is None:
        return await render_rollback(settings, namespace, name, to, unpinning)
    async with client:
        kube = Kube(client, "niphas-rollback")
        if unpinning:
            await unpin(kube, namespace, name)
            return None
        return await rollback(kube, namespace, name, to)


def rollback_command(
    name: Annotated[str, typer.Argument(help="The NiphasWorkload's name")],
    to: Annotated[
        int | None, typer.Option("--to", help="History revision (status.history[].revision)")
    ] = None,
    namespace: Annotated[str, typer.Option("--namespace", "-n", help="Its namespace")] = "default",
    kubeconfig: Annotated[
        Path | None,
        typer.Option(help="kubeconfig file (default: KUBECONFIG, in-cluster, else render mode)"),
    ] = None,
    unpin: Annotated[
        bool, typer.Option("--unpin", help="Follow builds again instead of pinning")
    ] = False,
) -> None:
    """Pin a workload to an earlier store path from its history (no evaluation or build)."""
    try:
        entry = asyncio.run(_run(kubeconfig, namespace, name, to, unpin))
    except (RollbackError, KubeError) as exc:
        typer.echo(f"rollback failed: {exc}", err=True)
        raise typer.Exit(1) from None
    if entry is None:
        typer.echo(f"{namespace}/{name} unpinned: it follows builds again")
        return
    commit = f" (commit {entry.commit[:12]})" if entry.commit else ""
    typer.echo(
        f"{namespace}/{name} pinned to revision {entry.revision}: {entry.store_path}{commit}"
    )
