"""`niphas logs`: a build's full log from the log stream, or every build of a push.

    niphas logs drv /nix/store/<hash>-app.drv      # or just <hash>
    niphas logs push <push event id or commit> -f  # follow while building

Fails fast and in one line as `niphas events` does (one connect attempt within
`NIPHAS_NATS_CONNECT_TIMEOUT_S`); an unknown id is `niphas logs: no log of <id>`, exit 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Annotated, Literal

import typer
from nats.errors import Error as NatsError

from niphas_common.bus.build_logs import BuildLogs, UnknownLog
from niphas_common.bus.connection import close_quietly
from niphas_common.cli_events import NatsUrl, Unreachable, connect_once, describe, nats_settings

Kind = Literal["drv", "push"]


def fail(message: str) -> typer.Exit:
    typer.echo(f"niphas logs: {message}", err=True)
    return typer.Exit(1)


async def show(logs: BuildLogs, kind: Kind, ident: str, follow: bool) -> None:
    """Print the log(s) of `ident` to stdout, following while the builds run."""
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
    kind: Annotated[str, typer.Argument(help="drv (a derivation path or hash) or push")],
    ident: Annotated[str, typer.Argument(help="the derivation, or the push's event id/commit")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Wait for more")] = False,
    nats_url: NatsUrl = None,
) -> None:
    """Print the full build log of a derivation, or of every build of a push."""
    if kind not in ("drv", "push"):
        raise typer.BadParameter(f"{kind!r}: expected drv or push", param_hint="KIND")
    settings = nats_settings(nats_url)

    async def go() -> None:
        nc = await connect_once(settings)
        try:
            await show(BuildLogs(nc.jetstream()), kind, ident, follow)  # type: ignore[arg-type]
        finally:
            await close_quietly(nc)

    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(go())
    except UnknownLog:
        raise fail(f"no log of {ident}") from None
    except Unreachable as exc:
        raise fail(f"{settings.url}: {exc}") from None
    except (NatsError, OSError, TimeoutError) as exc:
        raise fail(f"{settings.url}: {describe(exc, settings.connect_timeout_s)}") from None
