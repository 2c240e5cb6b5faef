"""Store paths: `<store dir>/<32 nix32 chars>-<name>`, parsed and validated like Nix does.

The *store dir* is the logical prefix baked into every path (normally /nix/store). A chroot
store (`nix --store /tmp/node1`) keeps the logical prefix and only moves where files live on
disk; `StoreDir.real_path` maps between the two.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from niphas_schemas.types import (
    HASH_PART_LEN,
    STORE_DIR,
    STORE_PATH_RE,
    hash_part_problem,
    name_problem,
)

from .errors import StorePathError


def validate_name(name: str) -> str:
    """Check a store path name (the part after `<hash>-`) against Nix's rules."""
    if (problem := name_problem(name)) is not None:
        raise StorePathError(problem)
    return name


def validate_hash_part(hash_part: str) -> str:
    """Check the 32-character nix32 hash part of a store path."""
    if (problem := hash_part_problem(hash_part)) is not None:
        raise StorePathError(problem)
    return hash_part


@dataclass(frozen=True, slots=True, order=True)
class StorePath:
    """A parsed store path. Orders like Nix's StorePathSet (by base name)."""

    hash_part: str
    name: str
    store_dir: str = field(default=STORE_DIR, compare=False)

    def __post_init__(self) -> None:
        validate_hash_part(self.hash_part)
        validate_name(self.name)

    @classmethod
    def parse(cls, path: str, store_dir: str = STORE_DIR) -> StorePath:
        """Parse an absolute store path; it must live directly under `store_dir`."""
        if store_dir == STORE_DIR and STORE_PATH_RE.match(path) is None:
            raise StorePathError(f"not a store path: {path!r}")
        prefix = store_dir.rstrip("/") + "/"
        if not path.startswith(prefix):
            raise StorePathError(f"{path!r} is not in the store dir {store_dir!r}")
        return cls.from_base_name(path[len(prefix) :], store_dir)

    @classmethod
    def from_base_name(cls, base_name: str, store_dir: str = STORE_DIR) -> StorePath:
        """Parse `<hash>-<name>` (how narinfo References spell paths)."""
        if len(base_name) < HASH_PART_LEN + 2 or base_name[HASH_PART_LEN] != "-":
            raise StorePathError(f"not a store path base name: {base_name!r}")
        return cls(base_name[:HASH_PART_LEN], base_name[HASH_PART_LEN + 1 :], store_dir)

    @property
    def base_name(self) -> str:
        """`<hash>-<name>`."""
        return f"{self.hash_part}-{self.name}"

    @property
    def is_derivation(self) -> bool:
        return self.name.endswith(".drv")

    def __str__(self) -> str:
        return f"{self.store_dir.rstrip('/')}/{self.base_name}"


@dataclass(frozen=True, slots=True)
class StoreDir:
    """Where a store's paths live: the logical dir and, for chroot stores, the real root."""

    path: str = STORE_DIR
    root: Path | None = None

    def parse(self, path: str) -> StorePath:
        """Parse a logical store path of this store."""
        return StorePath.parse(path, self.path)

    def real_path(self, path: StorePath | str) -> Path:
        """Where the files of `path` are on disk (under `root` for a chroot store)."""
        sp = path if isinstance(path, StorePath) else self.parse(path)
        logical = Path(self.path) / sp.base_name
        if self.root is None:
            return logical
        return self.root / logical.relative_to("/")

    def is_store_path(self, path: str) -> bool:
        try:
            self.parse(path)
        except StorePathError:
            return False
        return True
