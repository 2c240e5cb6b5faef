"""`.narinfo` documents: what a binary cache says about one store path.

    StorePath: /nix/store/<hash>-<name>
    URL: nar/<filehash>.nar.zst
    Compression: zstd
    FileHash: sha256:<nix32>
    FileSize: 1234
    NarHash: sha256:<nix32>
    NarSize: 5678
    References: <hash>-<name> <hash>-<name>
    Deriver: <hash>-<name>.drv
    Sig: <key name>:<base64>
    CA: fixed:r:sha256:<nix32>

Fields come in that order when Nix writes them; References and Deriver hold base names. When
parsing, unknown fields are kept (and written back) and a missing Compression means bzip2, as
in Nix. The signed part is the *fingerprint*: `1;<path>;<NarHash>;<NarSize>;<refs>`, refs as
full paths joined by commas, in sorted order.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from niphas_schemas.types import STORE_DIR

from .errors import HashError, NarinfoError, SignatureError, StorePathError
from .hashes import Hash
from .signing import SecretKey, TrustedKeys
from .store_path import StorePath

COMPRESSIONS = ("none", "xz", "bzip2", "zstd", "br", "gzip", "lz4", "lzip")
_NUMBER_RE = re.compile(r"^[0-9]{1,19}$")
_SINGLE = frozenset(
    [
        "StorePath",
        "URL",
        "Compression",
        "FileHash",
        "FileSize",
        "NarHash",
        "NarSize",
        "References",
        "Deriver",
        "CA",
    ]
)


def fingerprint(
    store_path: StorePath | str,
    nar_hash: Hash,
    nar_size: int,
    references: Iterable[StorePath | str],
) -> str:
    """The string Nix signs for a path: `1;<path>;<NarHash>;<NarSize>;<refs>`."""
    if nar_hash.algo != "sha256":
        raise SignatureError(f"{store_path}: only sha256 NAR hashes can be signed")
    if nar_size <= 0:
        raise SignatureError(f"{store_path}: cannot sign a path with an unknown NAR size")
    refs = ",".join(sorted(str(r) for r in references))
    return f"1;{store_path};{nar_hash.nix32};{nar_size};{refs}"


@dataclass(frozen=True, slots=True)
class NarInfo:
    """A parsed narinfo. Immutable: `signed()` returns a copy with one more signature."""

    store_path: StorePath
    url: str
    nar_hash: Hash
    nar_size: int
    compression: str = "none"
    file_hash: Hash | None = None
    file_size: int | None = None
    references: tuple[StorePath, ...] = ()
    deriver: StorePath | None = None
    sigs: tuple[str, ...] = ()
    ca: str | None = None
    extra: tuple[tuple[str, str], ...] = field(default=(), compare=False)
    """Fields we do not know, in document order, kept so that render() round-trips them."""

    @classmethod
    def parse(cls, text: str, store_dir: str = STORE_DIR) -> NarInfo:
        """Parse a narinfo document; raise NarinfoError (only) when it is not usable."""
        try:
            return cls._parse(text, store_dir)
        except (HashError, StorePathError) as exc:
            raise NarinfoError(f"invalid narinfo: {exc}") from exc

    @classmethod
    def _parse(cls, text: str, store_dir: str) -> NarInfo:
        fields: dict[str, str] = {}
        sigs: list[str] = []
        extra: list[tuple[str, str]] = []
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise NarinfoError(f"invalid narinfo line {lineno}: {line[:80]!r}")
            value = value.removeprefix(" ")
            if name == "Sig":
                sigs.append(value)
            elif name in _SINGLE:
                if name in fields:
                    # Two NarHash lines could mean different things to different readers.
                    raise NarinfoError(f"narinfo repeats the field {name!r}")
                fields[name] = value
            else:
                extra.append((name, value))
        for required in ("StorePath", "URL", "NarHash", "NarSize"):
            if not fields.get(required):
                raise NarinfoError(f"narinfo lacks the field {required!r}")
        store_path = StorePath.parse(fields["StorePath"], store_dir)
        compression = fields.get("Compression") or "bzip2"  # Nix's default for old caches
        deriver = fields.get("Deriver")
        return cls(
            store_path=store_path,
            url=fields["URL"],
            nar_hash=Hash.parse(fields["NarHash"]),
            nar_size=_number(fields["NarSize"], "NarSize"),
            compression=compression,
            file_hash=Hash.parse(fields["FileHash"]) if fields.get("FileHash") else None,
            file_size=_number(fields["FileSize"], "FileSize") if "FileSize" in fields else None,
            references=tuple(
                StorePath.from_base_name(ref, store_dir)
                for ref in fields.get("References", "").split()
            ),
            deriver=(
                StorePath.from_base_name(deriver, store_dir)
                if deriver and deriver != "unknown-deriver"
                else None
            ),
            sigs=tuple(sigs),
            ca=fields.get("CA") or None,
            extra=tuple(extra),
        )

    def render(self) -> str:
        """The narinfo document, fields in the order Nix writes them."""
        lines = [
            f"StorePath: {self.store_path}",
            f"URL: {self.url}",
            f"Compression: {self.compression}",
        ]
        if self.file_hash is not None:
            lines.append(f"FileHash: {self.file_hash.nix32}")
        if self.file_size is not None:
            lines.append(f"FileSize: {self.file_size}")
        lines += [
            f"NarHash: {self.nar_hash.nix32}",
            f"NarSize: {self.nar_size}",
            "References: " + " ".join(r.base_name for r in self.references),
        ]
        if self.deriver is not None:
            lines.append(f"Deriver: {self.deriver.base_name}")
        lines += [f"Sig: {sig}" for sig in self.sigs]
        if self.ca is not None:
            lines.append(f"CA: {self.ca}")
        lines += [f"{name}: {value}" for name, value in self.extra]
        return "\n".join(lines) + "\n"

    @property
    def hash_part(self) -> str:
        return self.store_path.hash_part

    def fingerprint(self) -> str:
        return fingerprint(self.store_path, self.nar_hash, self.nar_size, self.references)

    def signed(self, key: SecretKey) -> NarInfo:
        """A copy carrying `key`'s signature (replacing an older one by the same key name)."""
        sig = key.sign(self.fingerprint())
        others = tuple(s for s in self.sigs if s.partition(":")[0] != key.name)
        return replace(self, sigs=(*others, sig))

    def check_signature(self, trusted: TrustedKeys) -> str:
        """Return one valid trusted signature, or raise SignatureError naming the path."""
        if not self.sigs:
            raise SignatureError(f"{self.store_path}: narinfo has no signatures")
        try:
            valid = trusted.valid_signatures(self.fingerprint(), self.sigs)
        except SignatureError as exc:
            raise SignatureError(f"{self.store_path}: {exc}") from exc
        if not valid:
            names = ", ".join(sorted({s.partition(":")[0] for s in self.sigs}))
            raise SignatureError(
                f"{self.store_path}: no valid signature by a trusted key (signed by: {names})"
            )
        return valid[0]

    def reference_paths(self) -> Sequence[StorePath]:
        """References other than the path itself (self-references need no fetching)."""
        return [r for r in self.references if r != self.store_path]


def _number(value: str, name: str) -> int:
    if not _NUMBER_RE.match(value):
        raise NarinfoError(f"narinfo field {name} is not a number: {value[:40]!r}")
    return int(value)
