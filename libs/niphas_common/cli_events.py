"""`niphas events`: inspect the bus (streams, consumers, stored events, live tail)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer
from nats.js import JetStreamContext
from rich.console import Console
from rich.table import Table

from niphas_common.bus import inspect
from niphas_common.bus.connection import connect
from niphas_common.nats_server import embedded_url
from niphas_common.settings import CommonSettings, NatsSettings

app = typer.Typer(help="Inspect the event bus without disturbing the services' consumers.")
# Piped output (scripts, tests, `less`) gets full-width tables instead of 80 columns.
console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)

T = TypeVar("T")

NatsUrl = Annotated[
    str | None,
    typer.Option("--nats-url", envvar="NATS_URL", help="Server URL (default: `niphas up`'s)"),
]


def nats_settings(url: str | None) -> NatsSettings:
    settings = NatsSettings()
    url = url or settings.url or embedded_url(CommonSettings().state_dir)
    if not url:
        raise typer.BadParameter("no NATS server: pass --nats-url, set NATS_URL or run `niphas up`")
    return settings.model_copy(update={"url": url})


def with_js(url: str | None, action: Callable[[JetStreamContext], Awaitable[T]]) -> T:
    async def go() -> T:
        nc = await connect(nats_settings(url), name="niphas-events")
        try:
            return await action(nc.jetstream())
        finally:
            await nc.close()

    try:
        return asyncio.run(go())
    except LookupError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None


@app.command("streams")
def streams_cmd(nats_url: NatsUrl = None) -> None:
    """List streams with their subjects, message counts and sizes."""
    infos = with_js(nats_url, inspect.streams)
    table = Table("stream", "subjects", "messages", "bytes", "first seq", "last seq", "consumers")
    for info in infos:
        state = info.state
        table.add_row(
            info.config.name or "",
            ", ".join(info.config.subjects or []),
            str(state.messages),
            str(state.bytes),
            str(state.first_seq),
            str(state.last_seq),
            str(state.consumer_count),
        )
    console.print(table)


@app.command("consumers")
def consumers_cmd(stream: str, nats_url: NatsUrl = None) -> None:
    """List a stream's durable consumers and how far behind they are."""
    infos = with_js(nats_url, lambda js: inspect.consumers(js, stream))
    table = Table("consumer", "subject", "pending", "ack pending", "redelivered", "delivered")
    for info in infos:
        table.add_row(
            info.name,
            info.config.filter_subject or "",
            str(info.num_pending),
            str(info.num_ack_pending),
            str(info.num_redelivered),
            str(info.delivered.stream_seq if info.delivered else 0),
        )
    console.print(table)


def print_message(msg: inspect.StoredMessage) -> None:
    when = msg.time.isoformat() if msg.time else "?"
    console.print(f"[bold]{msg.subject}[/bold]  {msg.stream} #{msg.sequence}  {when}")
    for key, value in sorted(msg.headers.items()):
        console.print(f"  {key}: {value}", markup=False)
    try:
        body = json.dumps(json.loads(msg.data), indent=2, ensure_ascii=False)
    except (UnicodeDecodeError, json.JSONDecodeError):
        body = repr(msg.data)
    console.print(body, markup=False)
    console.print()


@app.command("view")
def view_cmd(
    subject: str,
    last: Annotated[int, typer.Option("-n", "--last", min=1, help="How many, newest last")] = 10,
    nats_url: NatsUrl = None,
) -> None:
    """Print stored events on SUBJECT (wildcards allowed, e.g. 'dead.>') with headers."""
    messages = with_js(nats_url, lambda js: inspect.view(js, subject, last))
    if not messages:
        console.print(f"no events on {subject}")
    for msg in messages:
        print_message(msg)


@app.command("tail")
def tail_cmd(subject: str, nats_url: NatsUrl = None) -> None:
    """Print new events on SUBJECT as they arrive, until Ctrl-C."""

    async def follow(js: JetStreamContext) -> None:
        async for msg in inspect.tail(js, subject):
            print_message(msg)

    with contextlib.suppress(KeyboardInterrupt):
        with_js(nats_url, follow)
