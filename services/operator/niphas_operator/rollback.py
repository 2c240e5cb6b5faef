"""`niphas rollback NAME [--to N]`: pin a workload to a store path from its history.

Rolling back is one merge patch of `spec.storePath`: the closure was built before, so the
reconciler re-applies the Deployment with it at once, with no evaluation, build or event.
Without `--to`, the entry before the one running now is chosen. `niphas rollback NAME
--unpin` (or `kubectl patch nw NAME --type merge -p '{"spec":{"storePath":null}}'`) unpins:
the workload follows builds again.

The patch goes to the workload store the operator uses: the API server, or with no cluster
configured the file store (the pin in the workload's status file, under its lock; the
workload file is the user's and stays untouched). There nothing watches, so the command runs
the reconciler once itself and the manifests are rendered again at once.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from niphas_common.kube.client import KubeConflict, KubeError
from niphas_common.kube.config import connect
from niphas_common.kube.watch import Backoff
from niphas_operator.file_store import FileStore
from niphas_operator.kubernetes_store import KubernetesStore
from niphas_operator.reconciler import Reconciler
from niphas_operator.settings import OperatorSettings
from niphas_operator.store import Key, WorkloadStore
from niphas_operator.workload import HistoryEntry, Workload
from niphas_schemas import WorkloadRolled


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


CONFLICT_ATTEMPTS = 5
"""Reads and patches before giving up while the operator keeps writing the workload's status
(each write changes the resourceVersion the patch is conditional on)."""


async def rollback(store: WorkloadStore, key: Key, to: int | None) -> HistoryEntry:
    """Pin the chosen entry, conditional on the workload read: a patch that lost a race with
    a status write (409) is decided again on a fresh read."""
    for attempt in range(1, CONFLICT_ATTEMPTS + 1):
        obj = await store.get(key)
        if obj is None:
            raise RollbackError(f"no NiphasWorkload {key[0]}/{key[1]}")
        workload = Workload(obj)
        entry = choose(workload, to)
        try:
            await store.merge_patch(
                key,
                {
                    "metadata": {"resourceVersion": workload.resource_version},
                    "spec": {"storePath": entry.store_path},
                },
            )
        except KubeConflict:
            if attempt == CONFLICT_ATTEMPTS:
                raise
            await asyncio.sleep(0.05 * attempt)
            continue
        return entry
    raise AssertionError("unreachable")


async def unpin(store: WorkloadStore, key: Key) -> None:
    await store.merge_patch(key, {"spec": {"storePath": None}})


async def _nothing_to_publish(event: object) -> None:
    """A pinned workload asks for no build and skips preheating; with no bus on one machine,
    its rollout announcement (`workload.status`) goes nowhere."""
    if not isinstance(event, WorkloadRolled):
        raise AssertionError(f"a rollback's reconcile published {event!r}")


async def _on_files(
    settings: OperatorSettings, key: Key, to: int | None, unpinning: bool
) -> HistoryEntry | None:
    store = FileStore.from_settings(settings)
    if unpinning:
        # The manifests already run the pinned path, which status now records: they stay.
        await unpin(store, key)
        return None
    entry = await rollback(store, key, to)
    reconciler = Reconciler(
        store,
        _nothing_to_publish,
        settings.pod(),
        preheat_nodes=(),
        preheat_deadline_s=settings.preheat_deadline_s,
    )
    await reconciler.reconcile(*key)
    return entry


async def _run(
    kubeconfig: Path | None, key: Key, to: int | None, unpinning: bool
) -> HistoryEntry | None:
    settings = OperatorSettings()
    kube = await connect(kubeconfig or settings.kubeconfig, "niphas-rollback")
    if kube is None:
        return await _on_files(settings, key, to, unpinning)
    async with kube:
        backoff = Backoff(settings.retry_base_s, settings.retry_max_s)
        store = await KubernetesStore.connect(
            kube, namespace=key[0], resync_s=settings.resync_s, retry=backoff
        )
        if unpinning:
            await unpin(store, key)
            return None
        return await rollback(store, key, to)


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
        entry = asyncio.run(_run(kubeconfig, (namespace, name), to, unpin))
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
