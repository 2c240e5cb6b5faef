"""A build's full log, written to the log stream while the build runs.

`LogWriter` gets the build's output as it comes (`feed`, synchronous, from the nix runner)
and sends it in pieces every `FLUSH_S` or when `FLUSH_BYTES` gathered, so `niphas logs -f`
and the reporter's HTTP follow it live. A log is capped at `max_bytes`: past the cap the
output is counted, not kept, and the end of the log (from the executor's outcome) is added
after a line saying how much was left out, so the error at the bottom is always there.
Writing a log never fails a build: trouble reaching NATS is one warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable

from niphas_common.bus.build_logs import BuildLogs

log = logging.getLogger(__name__)

FLUSH_S = 0.5
FLUSH_BYTES = 64 * 1024
TAIL_BYTES = 64 * 1024
"""Bytes of the log's end kept after a cut."""


class LogWriter:
    def __init__(self, logs: BuildLogs, key: str, max_bytes: int) -> None:
        self.logs = logs
        self.key = key
        self.max_bytes = max_bytes
        self._pending = bytearray()
        self._kept = 0
        self._cut = 0
        self._wake = asyncio.Event()
        self._broken = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._safely(self.logs.start(self.key))
        self._task = asyncio.create_task(self._flusher(), name=f"log {self.key}")

    def feed(self, data: bytes) -> None:
        room = self.max_bytes - self._kept
        kept = data[: max(room, 0)]
        self._cut += len(data) - len(kept)
        self._kept += len(kept)
        self._pending += kept
        if len(self._pending) >= FLUSH_BYTES:
            self._wake.set()

    async def finish(self, outcome: str, full_log: str = "", note: str = "") -> None:
        """Send what is left, the log's end if it was cut, `note`, then the end marker."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._cut:
            tail = full_log.encode()[-TAIL_BYTES:]
            self._pending += (
                f"\n... {self._cut} bytes not kept (log capped at {self.max_bytes})".encode()
            )
            self._pending += b" ...\n" + tail
        if note:
            self._pending += f"\n{note}\n".encode()
        await self._flush()
        await self._safely(self.logs.finish(self.key, outcome))

    async def _flusher(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), FLUSH_S)
            self._wake.clear()
            await self._flush()

    async def _flush(self) -> None:
        if not self._pending:
            return
        data, self._pending = bytes(self._pending), bytearray()
        await self._safely(self.logs.append(self.key, data))

    async def _safely(self, step: Awaitable[None]) -> None:
        try:
            await step
        except Exception as exc:
            if not self._broken:
                log.warning("log of %s not kept: %r", self.key, exc)
            self._broken = True
