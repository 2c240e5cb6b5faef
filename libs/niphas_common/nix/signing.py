"""Ed25519 keys and signatures in Nix's formats.

Keys are `<name>:<base64>`: 64 bytes (seed then public key, libsodium's layout) for a secret
key, 32 bytes for a public key, exactly what `nix key generate-secret` and
`nix key convert-secret-to-public` print. A signature is `<key name>:<base64 of 64 bytes>` over a
narinfo's fingerprint (see `narinfo.fingerprint`). Ed25519 is deterministic, so our signatures
are byte-identical to `nix store sign`'s.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .errors import SignatureError

SECRET_KEY_LEN = 64
PUBLIC_KEY_LEN = 32
SIGNATURE_LEN = 64


def _split(text: str, what: str, size: int) -> tuple[str, bytes]:
    name, sep, body = text.strip().partition(":")
    if not sep or not name:
        raise SignatureError(f"{what} must look like '<name>:<base64>'")
    try:
        raw = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"{what} {name!r} is not valid base64") from exc
    if len(raw) != size:
        raise SignatureError(f"{what} {name!r} must be {size} bytes, got {len(raw)}")
    return name, raw


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A named Ed25519 public key (`cache.example.org-1:<base64>`)."""

    name: str
    key: bytes

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        return cls(*_split(text, "public key", PUBLIC_KEY_LEN))

    def __str__(self) -> str:
        return f"{self.name}:{base64.b64encode(self.key).decode()}"

    def verify(self, message: str | bytes, signature: str) -> bool:
        """Whether `signature` (`name:base64`) is this key's signature of `message`."""
        try:
            name, raw = _split(signature, "signature", SIGNATURE_LEN)
        except SignatureError:
            return False
        if name != self.name:
            return False
        data = message.encode() if isinstance(message, str) else message
        try:
            Ed25519PublicKey.from_public_bytes(self.key).verify(raw, data)
        except (InvalidSignature, ValueError):
            return False
        return True


@dataclass(frozen=True, slots=True)
class SecretKey:
    """A named Ed25519 secret key in Nix's 64-byte (seed + public key) layout."""

    name: str
    key: bytes

    def __post_init__(self) -> None:
        if len(self.key) != SECRET_KEY_LEN:
            raise SignatureError(f"secret key {self.name!r} must be {SECRET_KEY_LEN} bytes")
        seed, public = self.key[:32], self.key[32:]
        derived = _public_bytes(Ed25519PrivateKey.from_private_bytes(seed))
        if derived != public:
            # A key file whose halves disagree would sign with one key and advertise another.
            raise SignatureError(f"secret key {self.name!r}: public half does not match the seed")

    @classmethod
    def parse(cls, text: str) -> SecretKey:
        return cls(*_split(text, "secret key", SECRET_KEY_LEN))

    @classmethod
    def load(cls, path: str | Path) -> SecretKey:
        """Read a key file written by `nix key generate-secret`."""
        try:
            return cls.parse(Path(path).read_text())
        except OSError as exc:
            raise SignatureError(f"cannot read secret key file {path}: {exc}") from exc

    @classmethod
    def generate(cls, name: str) -> SecretKey:
        if not name or ":" in name:
            raise SignatureError(f"invalid key name {name!r}")
        private = Ed25519PrivateKey.generate()
        return cls(name, private.private_bytes_raw() + _public_bytes(private))

    def __str__(self) -> str:
        return f"{self.name}:{base64.b64encode(self.key).decode()}"

    def __repr__(self) -> str:
        return f"SecretKey(name={self.name!r}, key=<hidden>)"  # never leak key bytes to logs

    @property
    def public_key(self) -> PublicKey:
        return PublicKey(self.name, self.key[32:])

    def sign(self, message: str | bytes) -> str:
        """Sign `message`; return `name:base64` as it goes into a narinfo `Sig:` line."""
        data = message.encode() if isinstance(message, str) else message
        raw = Ed25519PrivateKey.from_private_bytes(self.key[:32]).sign(data)
        return f"{self.name}:{base64.b64encode(raw).decode()}"


def _public_bytes(private: Ed25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


class TrustedKeys(Mapping[str, PublicKey]):
    """The public keys a client trusts, by name (like Nix's `trusted-public-keys`)."""

    def __init__(self, keys: Iterable[PublicKey | str] = ()) -> None:
        self._keys: dict[str, PublicKey] = {}
        for key in keys:
            pk = key if isinstance(key, PublicKey) else PublicKey.parse(key)
            self._keys[pk.name] = pk

    @classmethod
    def parse(cls, text: str) -> TrustedKeys:
        """Parse a whitespace-separated list, as in nix.conf."""
        return cls(text.split())

    def __getitem__(self, name: str) -> PublicKey:
        return self._keys[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def valid_signatures(self, message: str | bytes, signatures: Iterable[str]) -> list[str]:
        """The signatures among `signatures` made by a trusted key over `message`."""
        valid = []
        for sig in signatures:
            key = self._keys.get(sig.partition(":")[0])
            if key is not None and key.verify(message, sig):
                valid.append(sig)
        return valid
