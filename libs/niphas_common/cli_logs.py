"""`niphas logs`: a build's full log from the log stream, every build of a push, or every
build of the commit a workload runs.

    niphas logs drv /nix/store/<hash>-app.drv      # or just <hash>
    niphas logs push <push event id or commit> -f  # follow while building
    niphas logs workload <namespace>/<name>        # the commit in its status.commit

Fails fast and in one line as `niphas events` does (one connect attempt within
`NIPHAS_NATS_CONNECT_TIMEOUT_S`); an unknown id is `niphas logs: no log of <id>`, exit 1; an
unknown workload, one that runs no commit yet, no cluster or an unusable kubeconfig is one
line too.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
from pathlib import Path
from typing import Annotated, Final, Literal

import typer
from nats.errors import Error as NatsError

from niphas_common.bus.build_logs import BuildLogs, UnknownLog
from niphas_common.bus.connection import close_quietly
from niphas_common.cli_events import NatsUrl, Unreachable, connect_once, describe, nats_settings

Kind = Literal["drv", "push", "workload"]
WORKLOAD_API: Final = "niphas.io/v1alpha1"
WORKLOAD_PLURAL: Final = "niphasworkloads"
_NAMESPACE: Final = re.compile(r"[a-z0-9]([a-z0-9\-]{0,61}[a-z0-9])?")
_NAME: Final = re.compile(r"[a-z0-9]([a-z0-9.\-]{0,251}[a-z0-9])?")


class NoWorkload(LookupError):
    """The workload is not there, or runs no commit whose builds could be shown."""


def fail(message: str) -> typer.Exit:
    typer.echo(f"niphas logs: {message}", err=True)
    return typer.Exit(1)


def workload_key(ident: str) -> tuple[str, str]:
    """`<namespace>/<name>` (or `<name>` in `default`), checked before any request."""
    namespace, _, name = ident.rpartition("/")
    namespace = namespace or "default"
    if not (_NAMESPACE.fullmatch(namespace) and _NAME.fullmatch(name)):
        raise NoWorkload(f"{ident!r}: expected <namespace>/<name> of a NiphasWorkload")
    return namespace, name


async def workload_commit(kubeconfig: Path | None, ident: str) -> str:
    """The commit the NiphasWorkload `ident` runs (its status.commit), read from the cluster
    of `kubeconfig` (else KUBECONFIG, else in-cluster); `NoWorkload` says why not."""
    from niphas_common.kube.client import KubeError, resource_path  # only for this kind
    from niphas_common.kube.config import NoCluster, connect

    namespace, name = workload_key(ident)
    path = resource_path(WORKLOAD_API, WORKLOAD_PLURAL, namespace, name)
    try:
        kube = await connect(kubeconfig, "niphas-logs")
        if kube is None:
            raise NoCluster("no cluster configured: pass --kubeconfig or set KUBECONFIG")
        async with kube:
            obj = await kube.get(path)
    except (NoCluster, KubeError) as exc:
        raise NoWorkload(f"{namespace}/{name}: {exc}") from None
    if obj is None:
        raise NoWorkload(f"no workload {namespace}/{name}")
    status = obj.get("status") or {}
    commit = status.get("commit")
    if not isinstance(commit, str) or not commit:
        phase = status.get("phase") or "no status yet"
        raise NoWorkload(f"{namespace}/{name} runs no built commit yet ({phase})")
    return commit


async def show(logs: BuildLogs, kind: Kind, ident: str, follow: bool) -> None:
    """Print the log(s) of `ident` to stdout, following while the builds run (`ident` of a
    workload: the commit it runs)."""
    if kind == "drv":
        builds = [("", ident)]
    else:
        builds = await logs.builds_of_push(ident)
    for attribute, key in builds:
        if attribute:
            sys.stdout.write(f"==> {attribute} ({key}) <==\n")
        try:
            chunks = logs.follow(key) if follow else logs.chunks(key)
            async for chunk in chunks:
                sys.stdout.write(chunk.text)
                if chunk.end is not None:
                    sys.stdout.write(f"\n[{chunk.end}]\n")
                sys.stdout.flush()
        except UnknownLog:
            if kind == "drv":
                raise
            sys.stdout.write("(no log kept: cached, not built here, or expired)\n")


def logs(
    kind: Annotated[str, typer.Argument(help="drv (a derivation path or hash), push, or workload")],
    ident: Annotated[
        str,
        typer.Argument(
            help="the derivation, the push's event id/commit, or the workload's <namespace>/<name>"
        ),
    ],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Wait for more")] = False,
    nats_url: NatsUrl = None,
    kubeconfig: Annotated[
        Path | None,
        typer.Option(help="kubeconfig of the workload's cluster (default: KUBECONFIG, in-cluster)"),
    ] = None,
) -> None:
    """Print the full build log of a derivation, of every build of a push, or of every build
    of the commit a workload runs."""
    if kind not in ("drv", "push", "workload"):
        raise typer.BadParameter(f"{kind!r}: expected drv, push or workload", param_hint="KIND")
    settings = nats_settings(nats_url)
    looked_up = ident

    async def go() -> None:
        nonlocal looked_up
        if kind == "workload":
            looked_up = await workload_commit(kubeconfig, ident)
        nc = await connect_once(settings)
        try:
            if kind == "workload":
                sys.stdout.write(f"==> {ident} runs commit {looked_up} <==\n")
            what: Kind = "drv" if kind == "drv" else "push"
            await show(BuildLogs(nc.jetstream()), what, looked_up, follow)
        finally:
            await close_quietly(nc)

    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(go())
    except UnknownLog:
        raise fail(f"no log of {looked_up}") from None
    except NoWorkload as exc:
        raise fail(str(exc)) from None
    except Unreachable as exc:
        raise fail(f"{settings.url}: {exc}") from None
    except (NatsError, OSError, TimeoutError) as exc:
        raise fail(f"{settings.url}: {describe(exc, settings.connect_timeout_s)}") from None
