"""One way to connect to NATS, with every auth option of `NatsSettings` passed through.

nats-py's default error callback logs a traceback on every failed reconnect attempt (twice a
second while the server is down or refuses us); `ConnectionLog` replaces it with one concise
line per change of state: the first error of a kind, the disconnection, the reconnection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import Any

from nats.aio.client import Client

from niphas_common.settings import NatsSettings

log = logging.getLogger(__name__)


class ConnectionLog:
    """The callbacks of one connection, logging each state change once."""

    def __init__(self, name: str, client: Client | None = None) -> None:
        self.name = name
        self.client = client
        """The client these callbacks serve: nats-py calls `disconnected` on a close too."""
        self._seen: set[str] = set()
        """Errors logged since the connection was last up (a refused attempt alternates
        between the server's answer and the reset that follows it)."""

    async def error(self, exc: Exception) -> None:
        text = f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__
        if text in self._seen:
            log.debug("%s: NATS: %s (again)", self.name, text)
            return
        self._seen.add(text)
        log.warning("%s: NATS: %s", self.name, text)

    async def disconnected(self) -> None:
        if self.client is not None and self.client.is_closed:
            # Our own close (nats-py marks the client closed before this callback).
            log.debug("%s: NATS connection closed", self.name)
            return
        log.warning("%s: NATS disconnected, reconnecting", self.name)

    async def reconnected(self) -> None:
        self._seen.clear()
        log.info("%s: NATS reconnected", self.name)


def connect_options(
    settings: NatsSettings, *, name: str, client: Client | None = None
) -> dict[str, Any]:
    """`Client.connect` keywords; `client` (the one they are for) tells the log a close of
    ours from a lost connection."""
    if not settings.url:
        raise ValueError("no NATS URL: set NATS_URL (or NIPHAS_NATS_URL), or run `niphas up`")
    options: dict[str, Any] = {
        "servers": [u.strip() for u in settings.url.split(",") if u.strip()],
        "name": name,
        "connect_timeout": settings.connect_timeout_s,
        # A service outlives NATS restarts: keep reconnecting rather than dying.
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
    }
    callbacks = ConnectionLog(name, client)
    options["error_cb"] = callbacks.error
    options["disconnected_cb"] = callbacks.disconnected
    options["reconnected_cb"] = callbacks.reconnected
    if settings.user:
        options["user"] = settings.user
        options["password"] = settings.password or ""
    if settings.token:
        options["token"] = settings.token
    if settings.creds_file:
        options["user_credentials"] = str(settings.creds_file)
    if settings.tls_ca_file or settings.tls_cert_file:
        context = ssl.create_default_context(
            cafile=str(settings.tls_ca_file) if settings.tls_ca_file else None
        )
        if settings.tls_cert_file:
            context.load_cert_chain(
                str(settings.tls_cert_file),
                str(settings.tls_key_file) if settings.tls_key_file else None,
            )
        options["tls"] = context
    return options


async def connect(settings: NatsSettings, *, name: str) -> Client:
    """A connected client; a connect that fails or is cancelled closes its half-open socket
    (nats-py leaves it open, to be found by the garbage collector)."""
    client = Client()
    try:
        await client.connect(**connect_options(settings, name=name, client=client))
    except BaseException:
        await close_quietly(client)
        raise
    return client


async def close_quietly(client: Client) -> None:
    """Close `client` whatever state it is in, within a second."""
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await asyncio.wait_for(client.close(), 1.0)
    transport = getattr(client, "_transport", None)
    if transport is not None:
        with contextlib.suppress(Exception):
            transport.close()
