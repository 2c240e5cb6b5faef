"""NAR serialisation and unpacking against the real Nix: byte-identical to `nix-store --dump`
for a tree full of edge cases, the same narHash/narSize as `nix path-info`, exact
reproduction of a store path by unpacking (`nix hash path`), and hypothesis round trips."""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from niphas_common.nix.hashes import Hash
from niphas_common.nix.nar import INLINE_FILE_LIMIT, iter_nar, nar_bytes, nar_hash, write_nar
from niphas_common.nix.nar_parser import parse
from niphas_common.nix.nar_restore import restore
from niphas_common.nix.runner import NixRunner
from niphas_common.nix.store_path import StorePath

from . import nar_model
from .nar_model import Dir, File, Link

# Names whose order differs between bytewise sorting and most other collations.
SORT_NAMES = [b"B", b"a", b"Z", b"_", b"aa", b"a-b", b"a.b", b"A", b"~", b"0", b"\xc3\xa4"]


def make_tricky_tree(root: Path) -> None:
    """Every kind of entry the NAR format has, plus its awkward corners."""
    tree = Dir(
        {
            b"nested": Dir({b"a": Dir({b"b": Dir({b"c": Dir({b"leaf": File(b"deep\n")})})})}),
            b"empty-dir": Dir({}),
            b"empty-file": File(b""),
            b"exe": File(b"#!/bin/sh\necho hi\n", executable=True),
            b"dangling": Link(b"does/not/exist"),
            b"relative": Link(b"nested/a/b/c/leaf"),
            b"absolute": Link(b"/nonexistent/abs"),
            b"to-dir": Link(b"nested"),
            b"loop": Link(b"loop"),
            "héllo wörld".encode(): File("non-ASCII ✓\n".encode()),
            "日本語".encode(): Dir({"ファイル".encode(): File(b"x")}),
            b"not-utf8-\xff\xfe": File(b"raw bytes name"),
            b"sorting": Dir({name: File(name) for name in SORT_NAMES}),
            # sizes around the 8-byte padding and the inline/streamed boundary
            b"pad": Dir({f"{n}".encode(): File(b"p" * n) for n in range(1, 18)}),
            b"inline-edge": File(b"i" * INLINE_FILE_LIMIT),
            b"streamed": File(b"s" * (INLINE_FILE_LIMIT + 1)),
            b"large": File(os.urandom(3 << 20) + b"tail", executable=True),
        }
    )
    nar_model.build(tree, root)
    # Only the owner's execute bit makes a file executable in a NAR.
    group_exec = root / "group-exec-only"
    group_exec.write_bytes(b"not executable for Nix")
    group_exec.chmod(0o654)


@pytest.fixture
def tricky_tree(tmp_path: Path) -> Path:
    root = tmp_path / "tricky"
    make_tricky_tree(root)
    return root


@pytest.fixture
def tricky_store_path(nix_runner: NixRunner, tricky_tree: Path) -> Iterator[StorePath]:
    path = nix_runner.add_to_store(tricky_tree)
    yield path
    nix_runner.delete([path], check=False)  # still referenced elsewhere is fine


@pytest.mark.nix
def test_identical_to_nix_store_dump(nix_runner: NixRunner, tricky_tree: Path) -> None:
    expected = nix_runner.run("nix-store", "--dump", str(tricky_tree)).stdout
    assert nar_bytes(tricky_tree) == expected


@pytest.mark.nix
def test_nar_hash_matches_path_info(nix_runner: NixRunner, tricky_store_path: StorePath) -> None:
    info = nix_runner.path_info([tricky_store_path])[str(tricky_store_path)]
    assert nar_hash(str(tricky_store_path)) == (info.nar_hash, info.nar_size)


@pytest.mark.nix
def test_unpack_reproduces_store_path(
    nix_runner: NixRunner, tricky_store_path: StorePath, tmp_path: Path
) -> None:
    dest = tmp_path / "unpacked"
    size = restore(iter_nar(str(tricky_store_path)), dest)
    ours = nix_runner.run("nix", "hash", "path", "--base32", str(dest)).text.strip()
    theirs = nix_runner.path_info([tricky_store_path])[str(tricky_store_path)]
    assert Hash.parse(ours, algo="sha256") == theirs.nar_hash
    assert size == theirs.nar_size
    assert os.readlink(dest / "dangling") == "does/not/exist"
    assert os.access(dest / "exe", os.X_OK)
    assert not os.access(dest / "group-exec-only", os.X_OK)


def test_encoding_matches_independent_model(tmp_path: Path) -> None:
    tree = Dir({b"x": File(b"1", True), b"l": Link(b"x"), b"d": Dir({b"e": Dir({})})})
    nar_model.build(tree, tmp_path / "t")
    assert nar_bytes(tmp_path / "t") == nar_model.encode(tree)


def test_top_level_file_and_symlink(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"hello")
    (tmp_path / "l").symlink_to("f")
    assert nar_bytes(tmp_path / "f") == nar_model.encode(File(b"hello"))
    assert nar_bytes(tmp_path / "l") == nar_model.encode(Link(b"f"))


@pytest.mark.parametrize("kind", ["fd", "file", "buffer"])
def test_write_nar_outputs_agree(tricky_tree: Path, tmp_path: Path, kind: str) -> None:
    out = tmp_path / "out.nar"
    if kind == "buffer":
        buf = io.BytesIO()
        size = write_nar(tricky_tree, buf)
        data = buf.getvalue()
    else:
        with open(out, "wb") as f:
            size = write_nar(tricky_tree, f.fileno() if kind == "fd" else f)
        data = out.read_bytes()
    assert data == nar_bytes(tricky_tree)
    assert size == len(data)


def test_chunks_are_bounded(tricky_tree: Path) -> None:
    chunks = list(iter_nar(tricky_tree, chunk_size=4096))
    assert max(len(c) for c in chunks) <= 4096 + INLINE_FILE_LIMIT + 4096


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=nar_model.dirs(), cut=st.integers(min_value=1, max_value=97))
def test_round_trip_random_trees(tree: Dir, cut: int) -> None:
    expected = nar_model.encode(tree)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp, "src"), Path(tmp, "dst")
        nar_model.build(tree, src)
        data = nar_bytes(src)
        assert data == expected
        # Any chunking of the stream must unpack the same tree.
        pieces = [data[i : i + cut] for i in range(0, len(data), cut)]
        assert restore(pieces, dst) == len(data)
        assert nar_bytes(dst) == expected
        assert parse(data) == len(data)
