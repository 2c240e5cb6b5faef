"""Streaming decompression of cached NARs: every supported compression round-trips in any
chunking, multi-frame zstd works, and truncated, corrupt or over-long streams fail with
VerificationError."""

from __future__ import annotations

import bz2
import lzma
import os
from collections.abc import Callable

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from niphas_common.nix.compression import OUTPUT_CHUNK, decompressor
from niphas_common.nix.errors import VerificationError

COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "none": lambda b: b,
    "zstd": lambda b: zstandard.ZstdCompressor().compress(b),
    "xz": lzma.compress,
    "bzip2": bz2.compress,
}
DATA = os.urandom(3000) * 700  # compressible, > 2 MiB: several output chunks


def run(compression: str, packed: bytes, step: int) -> bytes:
    d = decompressor(compression)
    out = bytearray()
    for i in range(0, len(packed), step):
        for piece in d.decompress(packed[i : i + step]):
            assert len(piece) <= max(OUTPUT_CHUNK, step) or compression == "zstd"
            out += piece
    d.finish()
    return bytes(out)


@pytest.mark.parametrize("compression", list(COMPRESSORS))
@pytest.mark.parametrize("step", [1 << 20, 4099])
def test_round_trip(compression: str, step: int) -> None:
    assert run(compression, COMPRESSORS[compression](DATA), step) == DATA


@settings(max_examples=30, deadline=None)
@given(data=st.binary(max_size=3000), step=st.integers(1, 700))
def test_round_trip_any_chunking(data: bytes, step: int) -> None:
    for compression, compress in COMPRESSORS.items():
        assert run(compression, compress(data), step) == data


@pytest.mark.parametrize("compression", ["zstd", "xz", "bzip2"])
def test_truncated(compression: str) -> None:
    packed = COMPRESSORS[compression](DATA)
    with pytest.raises(VerificationError):
        run(compression, packed[: len(packed) - 7], 1 << 16)


@pytest.mark.parametrize("compression", ["zstd", "xz", "bzip2"])
def test_garbage(compression: str) -> None:
    with pytest.raises(VerificationError):
        run(compression, b"this is not compressed at all" * 10, 1 << 16)


@pytest.mark.parametrize("compression", ["xz", "bzip2"])
def test_trailing_garbage(compression: str) -> None:
    with pytest.raises(VerificationError, match="trailing"):
        run(compression, COMPRESSORS[compression](b"abc") + b"junk", 1 << 16)


def test_zstd_multiple_frames() -> None:
    c = zstandard.ZstdCompressor()
    assert run("zstd", c.compress(b"one ") + c.compress(b"two"), 5) == b"one two"


def test_unknown_compression() -> None:
    with pytest.raises(VerificationError, match="unsupported"):
        decompressor("rar")
