"""Helpers for the builder tests: read events back, serve a cache over HTTP, run a builder."""

from __future__ import annotations

import contextlib
import functools
import http.server
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TypeVar

from niphas_builder.app import wired
from niphas_builder.settings import BuilderSettings
from niphas_common.bus import inspect
from niphas_common.bus.bus import Bus
from niphas_schemas import Event
from tests.helpers import serving

E = TypeVar("E", bound=Event)


async def events(bus: Bus, model: type[E], last: int = 1000) -> list[E]:
    """Every stored event on `model`'s subject, oldest first."""
    try:
        stored = await inspect.view(bus.js, model.subject, last=last)
    except LookupError:
        return []
    return [model.model_validate_json(m.data) for m in stored]


@contextlib.asynccontextmanager
async def running_builder(bus: Bus, settings: BuilderSettings) -> AsyncIterator[None]:
    """The builder consuming eval.done in this process for the duration of the block."""
    async with wired(bus, settings) as builder, serving(bus, [builder.subscription()]):
        yield


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def http_cache(directory: Path, host: str = "127.0.0.1") -> Iterator[str]:
    """Serve a file binary cache over HTTP on a free port of `host` (static files, as the
    mesh agent or any web server would)."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer((host, 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
