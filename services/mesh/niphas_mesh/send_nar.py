"""A whole NAR from the store straight to the client's socket, file contents by sendfile.

`niphas_common.nix.nar.write_nar` serialises into a file descriptor and hands every large
file's contents to `os.sendfile`, so they never pass through Python (nginx's trick for its
static NAR files). It needs a blocking descriptor: for the duration of the response the
connection's socket is switched to blocking mode (with a send timeout, so a client that stops
reading cannot hold a thread for ever) and written from a thread of its own, while the event
loop neither reads nor writes that connection; then it is handed back to asyncio as it was.
A NAR still downloading is relayed the same way (`send_file_range`: sendfile of each part of
its partial file as it lands), so passing a path on to followers costs no copy through Python.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from aiohttp import web

from niphas_common.nix.errors import NarError
from niphas_common.nix.nar import write_nar

SEND_TIMEOUT_S = 60
"""Seconds a blocked send may wait for a client that stopped reading."""
_GONE = (BrokenPipeError, ConnectionResetError, BlockingIOError, TimeoutError)
"""How a send fails when the client disconnected or stopped reading (the send timeout)."""
_SENDERS = ThreadPoolExecutor(max_workers=32, thread_name_prefix="nar-send")
"""Threads writing NARs to sockets (one per download in flight; apart from the default pool)."""


async def send_whole_nar(request: web.BaseRequest, path: Path, size: int) -> int | None:
    """Write the NAR of `path` (`size` bytes, as announced in Content-Length) to the connection
    after the prepared response's headers; return the bytes sent, or None when the connection
    cannot take it (then the caller streams instead)."""
    async with blocking(request) as fd:
        if fd is None:
            return None
        loop = asyncio.get_running_loop()
        try:
            sent = await loop.run_in_executor(_SENDERS, write_nar, path, fd)
        except NarError as exc:
            if isinstance(exc.__cause__, _GONE):
                raise ConnectionResetError(f"the client went away: {exc.__cause__}") from exc
            raise
        if sent != size:
            raise ConnectionResetError(f"{path}: NAR of {sent} bytes, {size} announced")
        return sent


async def send_file_range(fd: int, f: BinaryIO, pos: int, n: int) -> int:
    """Send `n` bytes of `f` from `pos` to the blocking socket `fd` (from `blocking`) by
    sendfile, in a sender thread: straight from the page cache, never through Python."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_SENDERS, _sendfile, fd, f.fileno(), pos, n)


def _sendfile(out: int, src: int, pos: int, n: int) -> int:
    sent = 0
    try:
        while sent < n:
            done = os.sendfile(out, src, pos + sent, n - sent)
            if done == 0:
                raise ConnectionResetError(f"file ended {n - sent} bytes early")
            sent += done
    except _GONE as exc:
        raise ConnectionResetError(f"the client went away: {exc}") from exc
    return sent


@contextlib.asynccontextmanager
async def blocking(request: web.BaseRequest) -> AsyncIterator[int | None]:
    """The connection's socket in blocking mode (with a send timeout) for the rest of the
    response, for sender threads to write to while the event loop leaves it alone; None
    when it cannot be had (no socket, TLS). A failure inside aborts the connection (part of
    a body went out: it cannot be reused); otherwise it is handed back to asyncio as it was."""
    transport = request.transport
    sock = None if transport is None else transport.get_extra_info("socket")
    if transport is None or sock is None or transport.get_extra_info("sslcontext") is not None:
        yield None
        return
    while transport.get_write_buffer_size():  # the headers must be out before our bytes
        await asyncio.sleep(0.001)
        if transport.is_closing():
            raise ConnectionResetError("the client went away")
    fd = sock.fileno()
    transport.pause_reading()
    timeout = struct.pack("ll", SEND_TIMEOUT_S, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)
    os.set_blocking(fd, True)
    try:
        yield fd
    except BaseException:
        transport.abort()
        raise
    finally:
        if not transport.is_closing():
            os.set_blocking(fd, False)
            transport.resume_reading()
