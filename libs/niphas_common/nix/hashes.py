"""Hash values in the three spellings Nix uses, with conversions.

- SRI: `sha256-<base64>` (what new Nix prints, and flake lock files use),
- nix32: `sha256:<nix32>` (narinfo NarHash/FileHash, `nix path-info` in Nix 2.8),
- hex (base16): `sha256:<hex>` or a bare hex digest.

`Hash.parse` accepts all of them (and `algo:<base64>`), the way Nix's own `Hash::parseAny` does,
and tells the encodings apart by length.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from typing import Final

from . import nix32
from .errors import HashError, VerificationError

DIGEST_SIZES: Final = {"md5": 16, "sha1": 20, "sha256": 32, "sha512": 64}


@dataclass(frozen=True, slots=True)
class Hash:
    """A digest with its algorithm; immutable and comparable whatever spelling it came from."""

    algo: str
    digest: bytes

    def __post_init__(self) -> None:
        size = DIGEST_SIZES.get(self.algo)
        if size is None:
            raise HashError(f"unsupported hash algorithm {self.algo!r}")
        if len(self.digest) != size:
            raise HashError(f"{self.algo} digest must be {size} bytes, got {len(self.digest)}")

    @classmethod
    def parse(cls, text: str, algo: str | None = None) -> Hash:
        """Parse SRI, `algo:nix32`, `algo:hex` or `algo:base64`; bare digests need `algo`."""
        if ":" in text:
            prefix, _, body = text.partition(":")
            return cls._from_body(_check_algo(prefix, algo), body, text)
        if "-" in text and text.split("-", 1)[0] in DIGEST_SIZES:
            prefix, _, body = text.partition("-")
            prefix = _check_algo(prefix, algo)
            return cls(prefix, _b64decode(body, text, DIGEST_SIZES[prefix]))
        if algo is None:
            raise HashError(f"hash {text!r} has no algorithm prefix")
        return cls._from_body(_check_algo(algo, None), text, text)

    @classmethod
    def _from_body(cls, algo: str, body: str, text: str) -> Hash:
        size = DIGEST_SIZES[algo]
        if len(body) == size * 2:
            try:
                return cls(algo, bytes.fromhex(body))
            except ValueError as exc:
                raise HashError(f"invalid hex hash {text!r}") from exc
        if len(body) == nix32.encoded_len(size):
            return cls(algo, nix32.decode(body))
        if len(body) == len(base64.b64encode(bytes(size))):
            return cls(algo, _b64decode(body, text, size))
        raise HashError(f"hash {text!r} has the wrong length for {algo}")

    @classmethod
    def of(cls, data: bytes, algo: str = "sha256") -> Hash:
        """Hash `data` in one go."""
        return cls(algo, hashlib.new(algo, data).digest())

    @property
    def sri(self) -> str:
        """`sha256-<base64>`."""
        return f"{self.algo}-{base64.b64encode(self.digest).decode()}"

    @property
    def nix32(self) -> str:
        """`sha256:<nix32>`, the form narinfo files use."""
        return f"{self.algo}:{nix32.encode(self.digest)}"

    @property
    def hex(self) -> str:
        """Bare lowercase hex digest."""
        return self.digest.hex()

    @property
    def base16(self) -> str:
        """`sha256:<hex>`."""
        return f"{self.algo}:{self.digest.hex()}"

    def __str__(self) -> str:
        return self.nix32


def _check_algo(prefix: str, expected: str | None) -> str:
    if prefix not in DIGEST_SIZES:
        raise HashError(f"unsupported hash algorithm {prefix!r}")
    if expected is not None and prefix != expected:
        raise HashError(f"expected a {expected} hash, got {prefix}")
    return prefix


def _b64decode(body: str, text: str, size: int) -> bytes:
    try:
        digest = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise HashError(f"invalid base64 in hash {text!r}") from exc
    if len(digest) != size:
        raise HashError(f"hash {text!r} has the wrong length")
    return digest


class HashSink:
    """Hashes a stream and counts its bytes: the streaming half of NAR verification."""

    __slots__ = ("_hasher", "algo", "size")

    def __init__(self, algo: str = "sha256") -> None:
        if algo not in DIGEST_SIZES:
            raise HashError(f"unsupported hash algorithm {algo!r}")
        self.algo = algo
        self._hasher = hashlib.new(algo)
        self.size = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._hasher.update(data)
        self.size += len(data)

    def hash(self) -> Hash:
        return Hash(self.algo, self._hasher.digest())


class NarVerifier:
    """Checks a NAR stream against a narinfo's NarHash and NarSize while it passes through:
    fails as soon as it runs long, and in `finish()` when it is short or hashes differently.
    `what` (usually the store path) starts every error message."""

    __slots__ = ("_sink", "expected_hash", "expected_size", "what")

    def __init__(self, expected_hash: Hash, expected_size: int, what: str) -> None:
        self.expected_hash = expected_hash
        self.expected_size = expected_size
        self.what = what
        self._sink = HashSink(expected_hash.algo)

    @property
    def size(self) -> int:
        return self._sink.size

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._sink.update(data)
        if self._sink.size > self.expected_size:
            raise VerificationError(
                f"{self.what}: NAR larger than its NarSize {self.expected_size}"
            )

    def finish(self) -> None:
        if self._sink.size != self.expected_size:
            raise VerificationError(
                f"{self.what}: NarSize {self._sink.size} != {self.expected_size}"
            )
        got = self._sink.hash()
        if got != self.expected_hash:
            raise VerificationError(
                f"{self.what}: NarHash mismatch: narinfo says {self.expected_hash.nix32}, "
                f"NAR has {got.nix32}"
            )
