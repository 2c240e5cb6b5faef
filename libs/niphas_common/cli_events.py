"""`niphas events`: inspect the bus (streams, consumers, stored events, live tail).

Every command fails fast and in one line: one connect attempt within the connect timeout
(`NIPHAS_NATS_CONNECT_TIMEOUT_S`), no reconnecting, and any failure of the server (down, not
NATS, refusing us, without JetStream) printed as `niphas events: <url>: <cause>` with exit
status 1. A stream is named by its name or by any subject it holds; an unknown one is refused
with the list of streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from rich.console import Console
from rich.table import Table

from niphas_common.bus import inspect
from niphas_common.bus.connection import close_quietly, connect_options
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


class Unreachable(Exception):
    """The server could not be used (one line: the URL and the cause)."""


def fail(message: str) -> typer.Exit:
    typer.echo(f"niphas events: {message}", err=True)
    return typer.Exit(1)


async def connect_once(settings: NatsSettings) -> Client:
    """One connect attempt, no reconnects, no logging: the cause in `Unreachable`."""
    errors: list[Exception] = []

    async def record(exc: Exception) -> None:
        errors.append(exc)

    async def nothing() -> None:
        return None

    options: dict[str, Any] = {
        **connect_options(settings, name="niphas-events"),
        "allow_reconnect": False,
        "max_reconnect_attempts": 1,  # 0 would retry the initial connect forever
        "reconnect_time_wait": 0.1,
        "error_cb": record,
        "disconnected_cb": nothing,
        "reconnected_cb": nothing,
    }
    client = Client()
    try:
        await asyncio.wait_for(client.connect(**options), settings.connect_timeout_s)
    except (NatsError, OSError, TimeoutError) as exc:
        await close_quietly(client)
        cause = errors[0] if errors else exc
        raise Unreachable(describe(cause, settings.connect_timeout_s)) from None
    return client


def describe(exc: BaseException, timeout_s: float) -> str:
    """One line for a connection's failure."""
    if isinstance(exc, TimeoutError):
        return f"no NATS answer within {timeout_s:g} s"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)  # "Connection refused", not asyncio's wording
    text = str(exc).strip()
    return text.splitlines()[0].removeprefix("nats: ") if text else exc.__class__.__name__


def with_js(url: str | None, action: Callable[[JetStreamContext], Awaitable[T]]) -> T:
    settings = nats_settings(url)

    async def go() -> T:
        nc = await connect_once(settings)
        try:
            return await action(nc.jetstream())
        finally:
            await close_quietly(nc)

    try:
        return asyncio.run(go())
    except LookupError as exc:
        raise fail(str(exc).strip("'\"")) from None
    except Unreachable as exc:
        raise fail(f"{settings.url}: {exc}") from None
    except (NatsError, OSError, TimeoutError) as exc:
        raise fail(f"{settings.url}: {describe(exc, settings.connect_timeout_s)}") from None


async def resolve_stream(js: JetStreamContext, name: str) -> str:
    """The stream `name` names: a stream's name, or a subject one holds (`build.done`)."""
    known = [info.config.name or "" for info in await inspect.streams(js)]
    if name in known:
        return name
    try:
        return await inspect.stream_for(js, name)
    except LookupError:
        pass
    listed = ", ".join(known) or "none"
    raise LookupError(f"no stream or subject {name!r}; streams: {listed}")


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
    """List a stream's durable consumers and how far behind they are (STREAM: a stream's
    name or one of its subjects)."""

    async def consumers(js: JetStreamContext) -> list[Any]:
        return await inspect.consumers(js, await resolve_stream(js, stream))

    infos = with_js(nats_url, consumers)
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

    async def view(js: JetStreamContext) -> list[inspect.StoredMessage]:
        try:
            return await inspect.view(js, subject, last)
        except LookupError as exc:
            infos = await inspect.streams(js)
            for info in infos:  # a stream's name: its subject
                if info.config.name == subject and info.config.subjects:
                    return await inspect.view(js, info.config.subjects[0], last)
            listed = ", ".join(info.config.name or "" for info in infos) or "none"
            raise LookupError(f"{exc}; streams: {listed}") from None

    messages = with_js(nats_url, view)
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
