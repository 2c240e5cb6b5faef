"""One way to connect to NATS, with every auth option of `NatsSettings` passed through."""

from __future__ import annotations

import ssl
from typing import Any

import nats
from nats.aio.client import Client

from niphas_common.settings import NatsSettings


def connect_options(settings: NatsSettings, *, name: str) -> dict[str, Any]:
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
    client: Client = await nats.connect(**connect_options(settings, name=name))
    return client
