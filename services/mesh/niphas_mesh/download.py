"""Downloading one NAR from one holder into the node's incoming cache, verified on the way.

The holder is a transport, never a trust anchor: its narinfo must name the path and carry a
valid signature by a trusted key (the builder's), the NAR must match the signed NarHash and
NarSize, and it must parse as a NAR Nix itself could have written (no traversal names, no
entries through symlinks, bounded sizes). Only then do the NAR and its narinfo land in the
incoming directory, a file:// binary cache the importer hands to Nix.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

from niphas_common.nix.cache_client import BinaryCacheClient
from niphas_common.nix.errors import (
    CacheError,
    NarError,
    NarinfoError,
    NixError,
    SignatureError,
    VerificationError,
)
from niphas_common.nix.nar_parser import NarLimits, NarParser, NullSink
from niphas_common.nix.narinfo import NarInfo
from niphas_common.nix.store_path import StorePath

from .inflight import Partial

FLUSH_BYTES = 256 << 10
"""Bytes gathered before one write to disk (fewer thread hand-offs per NAR). Followers
streaming the download from this node see it advance in steps of this size, and in a tree of
nodes fetching one path at once each level adds about one step's worth of delay: at 1 MiB,
with a closure's eight downloads sharing a 128 Mbit/s link, 0.5 s per level."""


BUSY = 503
"""A holder's answer when it uploads to all the peers it takes (`upload_slots`): ask again."""


MISSING = 404
"""A NAR that is not there (yet)."""


class Rejected(Exception):
    """A holder could not give us a verified copy; `reason` labels metrics and logs."""

    def __init__(self, holder: str, reason: str, detail: str) -> None:
        super().__init__(f"{holder}: {reason}: {detail}")
        self.holder = holder
        self.reason = reason
        self.detail = detail


def reason_of(exc: NixError) -> str:
    if isinstance(exc, SignatureError):
        return "signature"
    if isinstance(exc, VerificationError):
        return "hash"
    if isinstance(exc, NarError):
        return "nar"
    if isinstance(exc, NarinfoError):
        return "narinfo"
    if isinstance(exc, CacheError) and _caused_by_timeout(exc):
        return "stall"
    if isinstance(exc, CacheError) and exc.status == BUSY:
        return "busy"
    if isinstance(exc, CacheError) and exc.status == MISSING:
        return "missing"  # a NAR gone or not there yet (a peer's download between attempts)
    return "error"


def _caused_by_timeout(exc: BaseException) -> bool:
    """Whether a socket read timed out somewhere down the cause chain (a stalled holder)."""
    cause = exc.__cause__
    while cause is not None:
        if isinstance(cause, TimeoutError):
            return True
        cause = cause.__cause__
    return False


async def fetch_narinfo(client: BinaryCacheClient, path: StorePath) -> NarInfo:
    try:
        info = await client.narinfo(path)
    except NixError as exc:
        raise Rejected(client.url, reason_of(exc), str(exc)) from exc
    if info is None:
        raise Rejected(client.url, "missing", f"{path} is not there")
    return info


async def fetch_nar(
    client: BinaryCacheClient, info: NarInfo, incoming: Path, partial: Partial
) -> int:
    """Download, verify and store the NAR of `info` in `incoming`; return its size.

    `partial` follows the bytes written, so peers can stream them before the end."""
    tmp = partial_file(info, incoming)
    parser = NarParser(NullSink(), NarLimits(max_nar_size=info.nar_size))
    buf = bytearray()
    started = False
    try:
        async with contextlib.aclosing(client.iter_nar(info)) as pieces:
            # The first bytes before anything is written: a holder that turns the download
            # away (busy, missing) leaves the partial download, and the peers streaming it
            # from this node, as they were.
            first = await anext(pieces, b"")
            with open(tmp, "wb") as f:  # noqa: ASYNC230 (opening is instant; writes are threaded)
                partial.writing(tmp, info)
                started = True
                piece = first
                while piece:
                    parser.feed(piece)
                    buf += piece
                    if len(buf) >= FLUSH_BYTES:
                        await _flush(f, buf, partial)
                    piece = await anext(pieces, b"")
                parser.finish()
                await _flush(f, buf, partial)
        land(info, incoming, tmp, partial)
    except BaseException as exc:
        if started:
            partial.fail()
        if isinstance(exc, NixError):
            raise Rejected(client.url, reason_of(exc), str(exc)) from exc
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return info.nar_size


def partial_file(info: NarInfo, incoming: Path) -> Path:
    """Where the NAR of `info` is written while it arrives."""
    return incoming / "nar" / f".{info.store_path.hash_part}.nar.partial"


def land(info: NarInfo, incoming: Path, tmp: Path, partial: Partial) -> None:
    """Move a verified NAR into the incoming cache, with the narinfo pointing at it."""
    name = f"{info.store_path.hash_part}.nar"
    os.replace(tmp, incoming / "nar" / name)
    partial.moved(incoming / "nar" / name)
    local = replace(info, url=f"nar/{name}", compression="none", file_hash=None, file_size=None)
    (incoming / f"{info.store_path.hash_part}.narinfo").write_text(local.render())


async def _flush(f: BinaryIO, buf: bytearray, partial: Partial) -> None:
    data = bytes(buf)
    buf.clear()
    await asyncio.to_thread(_write, f, data)
    partial.advance(len(data))


def _write(f: BinaryIO, data: bytes) -> None:
    f.write(data)
    f.flush()  # readers of the partial file use their own descriptor
