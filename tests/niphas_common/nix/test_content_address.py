"""Text and source store paths recomputed from content, checked against the paths real Nix
gave a `nix-instantiate`d closure: every `.drv` (text, with references), the
`builtins.path` and `fetchGit` sources, and a `builtins.toFile` text referring to a source."""

from __future__ import annotations

from pathlib import Path

import pytest

from niphas_common.nix.content_address import (
    compress_hash,
    make_type,
    source_path,
    text_path,
)
from niphas_common.nix.hashes import Hash
from niphas_common.nix.runner import NixRunner
from niphas_common.nix.store_path import StorePath

from .drv_samples import closure, instantiate, references

STORE = "/nix/store/"


def test_compress_hash_folds_by_xor() -> None:
    folded = bytes(i ^ (i + 20) if i < 12 else i for i in range(20))
    assert compress_hash(bytes(range(32))) == folded


def test_type_lists_references_sorted_and_self_last() -> None:
    b, a = f"{STORE}{'b' * 32}-b", f"{STORE}{'a' * 32}-a"
    assert make_type("source", [b, a], self_ref=True) == f"source:{a}:{b}:self"
    assert make_type("text", []) == "text"


@pytest.mark.nix
def test_text_and_source_paths_are_the_ones_nix_computes(
    tmp_path: Path, nix_runner: NixRunner
) -> None:
    paths = closure(nix_runner, instantiate(tmp_path, nix_runner))
    # (path-info of a .drv would describe its outputs)
    infos = nix_runner.path_info([p for p in paths if not p.endswith(".drv")])
    kinds = {"drv": 0, "text": 0, "source": 0}
    for path in paths:
        sp = StorePath.parse(path)
        refs = references(nix_runner, path)
        if sp.is_derivation or sp.name.startswith("note-"):
            contents = Path(path).read_bytes()
            assert text_path(sp.name, contents, refs) == sp, path
            # Not another path's: contents and references are both in the hash.
            assert text_path(sp.name, contents + b" ", refs) != sp
            assert text_path(sp.name, contents, refs[1:]) != sp or not refs
            kinds["drv" if sp.is_derivation else "text"] += 1
        else:
            assert source_path(sp.name, infos[path].nar_hash, refs) == sp, path
            other = Hash.of(b"other")
            assert source_path(sp.name, other, refs) != sp
            kinds["source"] += 1
    assert kinds["drv"] == 3 and kinds["text"] == 1 and kinds["source"] == 2, kinds


def test_source_paths_are_sha256_only() -> None:
    with pytest.raises(ValueError, match="sha256"):
        source_path("x", Hash.of(b"x", "sha512"))
