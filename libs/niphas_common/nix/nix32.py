"""Nix's base-32 encoding ("nix32"), used in store path hash parts and printed hashes.

It is not RFC 4648 base32: the alphabet drops e, o, t and u, and the digits are the bytes read
as one little-endian integer, printed most significant digit first.
"""

from __future__ import annotations

from niphas_schemas.types import NIX32_ALPHABET

from .errors import HashError

_DIGIT = {c: i for i, c in enumerate(NIX32_ALPHABET)}


def encoded_len(n_bytes: int) -> int:
    """Length of the nix32 form of `n_bytes` bytes (20 -> 32, 32 -> 52, 64 -> 103)."""
    return (n_bytes * 8 - 1) // 5 + 1 if n_bytes else 0


def decoded_len(n_chars: int) -> int:
    """Byte length whose nix32 form has `n_chars` characters."""
    return n_chars * 5 // 8


def encode(data: bytes) -> str:
    """Encode bytes to nix32."""
    value = int.from_bytes(data, "little")
    n = encoded_len(len(data))
    return "".join(NIX32_ALPHABET[(value >> (5 * i)) & 0x1F] for i in range(n - 1, -1, -1))


def decode(text: str) -> bytes:
    """Decode nix32 to bytes; raise HashError on bad characters, length or overflow."""
    n_bytes = decoded_len(len(text))
    if encoded_len(n_bytes) != len(text):
        raise HashError(f"invalid nix32 length {len(text)}: {text!r}")
    value = 0
    for ch in text:
        digit = _DIGIT.get(ch)
        if digit is None:
            raise HashError(f"invalid nix32 character {ch!r} in {text!r}")
        value = (value << 5) | digit
    if value >> (8 * n_bytes):
        # Nix rejects encodings whose top bits would spill past the last byte.
        raise HashError(f"nix32 value overflows {n_bytes} bytes: {text!r}")
    return value.to_bytes(n_bytes, "little")


def is_nix32(text: str) -> bool:
    """Whether `text` uses only nix32 characters (no length check)."""
    return all(ch in _DIGIT for ch in text)
