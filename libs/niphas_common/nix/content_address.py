"""Store paths computed from content, the way Nix names what it does not build.

A store path's hash part is `makeStorePath(type, inner hash, name)`: the sha256 of
`<type>:sha256:<inner hash, hex>:<store dir>:<name>`, folded to 20 bytes and printed in nix32.
Two kinds of path have an inner hash anyone can recompute from the bytes alone:

- **text** (`.drv` files, `builtins.toFile`): type `text:<ref>:<ref>...`, inner hash the
  sha256 of the file's contents (`makeTextPath`);
- **source** (`builtins.path`, `fetchGit`, flake inputs: anything added recursively with
  sha256): type `source:<ref>...[:self]`, inner hash the sha256 of the path's NAR, i.e. its
  NarHash (`makeFixedOutputPath` with recursive ingestion).

So a path of either kind can be checked against its content without trusting whoever sent it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from niphas_schemas.types import STORE_DIR

from . import nix32
from .hashes import Hash
from .store_path import StorePath

HASH_PART_BYTES = 20


def compress_hash(digest: bytes, size: int = HASH_PART_BYTES) -> bytes:
    """Nix's `compressHash`: XOR-fold `digest` into `size` bytes."""
    out = bytearray(size)
    for i, byte in enumerate(digest):
        out[i % size] ^= byte
    return bytes(out)


def make_type(kind: str, references: Iterable[StorePath | str], self_ref: bool = False) -> str:
    """`kind:<ref>:<ref>...[:self]`, the references as full paths in sorted order."""
    refs = sorted(str(r) for r in references)
    return ":".join([kind, *refs, *(["self"] if self_ref else [])])


def make_store_path(
    path_type: str, inner: Hash, name: str, store_dir: str = STORE_DIR
) -> StorePath:
    """Nix's `makeStorePath`."""
    text = f"{path_type}:{inner.algo}:{inner.hex}:{store_dir.rstrip('/')}:{name}"
    digest = compress_hash(hashlib.sha256(text.encode()).digest())
    return StorePath(nix32.encode(digest), name, store_dir)


def text_path(
    name: str, contents: bytes, references: Iterable[StorePath | str], store_dir: str = STORE_DIR
) -> StorePath:
    """Where Nix puts a text file (a `.drv`) with these contents and references."""
    return make_store_path(make_type("text", references), Hash.of(contents), name, store_dir)


def source_path(
    name: str,
    nar_hash: Hash,
    references: Iterable[StorePath | str] = (),
    *,
    self_ref: bool = False,
    store_dir: str = STORE_DIR,
) -> StorePath:
    """Where Nix puts a tree added recursively with sha256 (a `source`), given its NarHash.
    `references` are the other paths it refers to; one to itself is `self_ref`."""
    if nar_hash.algo != "sha256":
        raise ValueError(f"source paths are addressed by sha256, not {nar_hash.algo}")
    path_type = make_type("source", references, self_ref)
    return make_store_path(path_type, nar_hash, name, store_dir)
