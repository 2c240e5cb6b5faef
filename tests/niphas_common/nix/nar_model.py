"""A tiny in-memory model of file trees for NAR tests: build one on disk, encode it to NAR
bytes independently of the serialiser under test, and a hypothesis strategy for random trees."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from hypothesis import strategies as st


@dataclass(frozen=True)
class File:
    contents: bytes
    executable: bool = False


@dataclass(frozen=True)
class Link:
    target: bytes


@dataclass(frozen=True)
class Dir:
    entries: dict[bytes, Node]


Node = File | Link | Dir


def s(data: bytes) -> bytes:
    """One NAR string (written out here from the format description, on purpose)."""
    return struct.pack("<Q", len(data)) + data + bytes(-len(data) % 8)


def encode(node: Node) -> bytes:
    return s(b"nix-archive-1") + encode_node(node)


def encode_node(node: Node) -> bytes:
    if isinstance(node, File):
        exe = s(b"executable") + s(b"") if node.executable else b""
        return (
            s(b"(") + s(b"type") + s(b"regular") + exe + s(b"contents") + s(node.contents) + s(b")")
        )
    if isinstance(node, Link):
        return s(b"(") + s(b"type") + s(b"symlink") + s(b"target") + s(node.target) + s(b")")
    out = s(b"(") + s(b"type") + s(b"directory")
    for name in sorted(node.entries):
        child = encode_node(node.entries[name])
        out += s(b"entry") + s(b"(") + s(b"name") + s(name) + s(b"node") + child + s(b")")
    return out + s(b")")


def build(node: Node, path: Path | bytes) -> None:
    """Create `node` at `path` (which must not exist)."""
    p = os.fsencode(path)
    if isinstance(node, File):
        with open(p, "wb") as f:
            f.write(node.contents)
        os.chmod(p, 0o755 if node.executable else 0o644)
    elif isinstance(node, Link):
        os.symlink(node.target, p)
    else:
        os.mkdir(p)
        for name, child in node.entries.items():
            build(child, p + b"/" + name)


_names = st.binary(min_size=1, max_size=12).filter(
    lambda n: b"/" not in n and b"\0" not in n and n not in (b".", b"..")
)
_files = st.builds(File, st.binary(max_size=200), st.booleans())
_links = st.builds(Link, st.binary(min_size=1, max_size=40).filter(lambda t: b"\0" not in t))


def trees(max_leaves: int = 12) -> st.SearchStrategy[Node]:
    return st.recursive(
        st.one_of(_files, _links),
        lambda children: st.builds(Dir, st.dictionaries(_names, children, max_size=5)),
        max_leaves=max_leaves,
    )


def dirs(max_leaves: int = 12) -> st.SearchStrategy[Node]:
    return st.builds(Dir, st.dictionaries(_names, trees(max_leaves), max_size=5))
