"""Streaming decompression of NAR files as binary caches store them (none, zstd, xz, bzip2).

Each decompressor takes compressed chunks and yields decompressed pieces of bounded size, and
`finish()` insists the stream ended properly, so a truncated download is an error rather than
a silently short NAR.
"""

from __future__ import annotations

import bz2
import lzma
from collections.abc import Iterator
from typing import Final, Protocol

import zstandard

from .errors import VerificationError

OUTPUT_CHUNK: Final = 1 << 20
_ZSTD_INPUT_SLICE: Final = 64 << 10
"""zstd's decompressobj cannot cap its output, so input goes in small slices: a hostile frame
then inflates at most a bounded amount before the caller's NarSize check stops it."""


class Decompressor(Protocol):
    def decompress(self, data: bytes) -> Iterator[bytes]: ...
    def finish(self) -> None: ...


class _Identity:
    def decompress(self, data: bytes) -> Iterator[bytes]:
        if data:
            yield data

    def finish(self) -> None:
        pass


class _Lzma:
    """xz and bzip2: the stdlib decompressors share an API with output limits."""

    def __init__(self, factory: type[lzma.LZMADecompressor] | type[bz2.BZ2Decompressor]) -> None:
        self._d = factory()
        self._name = "xz" if factory is lzma.LZMADecompressor else "bzip2"

    def decompress(self, data: bytes) -> Iterator[bytes]:
        try:
            while True:
                if self._d.eof:
                    if data or self._d.unused_data:
                        raise VerificationError(f"trailing data after the {self._name} stream")
                    return
                out = self._d.decompress(data, max_length=OUTPUT_CHUNK)
                data = b""
                if out:
                    yield out
                if self._d.needs_input and not self._d.eof:
                    return
        except (lzma.LZMAError, OSError, EOFError, ValueError) as exc:
            raise VerificationError(f"corrupt {self._name} data: {exc}") from exc

    def finish(self) -> None:
        if not self._d.eof:
            raise VerificationError(f"{self._name} stream truncated")


class _Zstd:
    def __init__(self) -> None:
        self._d = zstandard.ZstdDecompressor().decompressobj()

    def decompress(self, data: bytes) -> Iterator[bytes]:
        view = memoryview(data)
        try:
            while view:
                if self._d.eof:
                    # Another frame follows (allowed by the format; Nix writes one).
                    self._d = zstandard.ZstdDecompressor().decompressobj()
                piece, view = view[:_ZSTD_INPUT_SLICE], view[_ZSTD_INPUT_SLICE:]
                out = self._d.decompress(piece)
                if self._d.eof and self._d.unused_data:
                    view = memoryview(self._d.unused_data + bytes(view))
                if out:
                    yield out
        except zstandard.ZstdError as exc:
            raise VerificationError(f"corrupt zstd data: {exc}") from exc

    def finish(self) -> None:
        if not self._d.eof:
            raise VerificationError("zstd stream truncated")


def decompressor(compression: str) -> Decompressor:
    """A fresh streaming decompressor for a narinfo `Compression:` value."""
    if compression in ("none", ""):
        return _Identity()
    if compression == "zstd":
        return _Zstd()
    if compression == "xz":
        return _Lzma(lzma.LZMADecompressor)
    if compression == "bzip2":
        return _Lzma(bz2.BZ2Decompressor)
    raise VerificationError(f"unsupported NAR compression {compression!r}")
