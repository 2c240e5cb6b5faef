"""narinfo parsing and rendering: byte-identical round trips of what `nix copy` writes,
signature checks, every field (Deriver, CA, unknown ones), Nix's defaults, rejection of
broken documents, and hypothesis fuzzing where only NarinfoError may escape."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from niphas_common.nix.errors import NarinfoError, SignatureError
from niphas_common.nix.hashes import Hash
from niphas_common.nix.narinfo import NarInfo
from niphas_common.nix.signing import SecretKey, TrustedKeys
from niphas_common.nix.store_path import StorePath
from tests.nix_harness import BuiltClosure, CacheKey, FileCache

H1 = "0" * 32
H2 = "1" * 32
NAR_HASH = Hash.of(b"nar")
SAMPLE = f"""\
StorePath: /nix/store/{H1}-hello-2.12
URL: nar/{Hash.of(b"file").nix32[7:]}.nar.xz
Compression: xz
FileHash: {Hash.of(b"file").nix32}
FileSize: 50264
NarHash: {NAR_HASH.nix32}
NarSize: 226560
References: {H2}-glibc-2.37 {H1}-hello-2.12
Deriver: {H2}-hello-2.12.drv
Sig: cache.nixos.org-1:{"A" * 86}==
CA: fixed:r:sha256:{NAR_HASH.nix32[7:]}
"""


def test_parse_sample() -> None:
    info = NarInfo.parse(SAMPLE)
    assert info.store_path == StorePath.from_base_name(f"{H1}-hello-2.12")
    assert info.compression == "xz"
    assert (info.file_size, info.nar_size) == (50264, 226560)
    assert info.file_hash == Hash.of(b"file")
    assert info.nar_hash == NAR_HASH
    assert [r.name for r in info.references] == ["glibc-2.37", "hello-2.12"]
    assert [r.name for r in info.reference_paths()] == ["glibc-2.37"]  # self-reference dropped
    assert info.deriver is not None
    assert info.deriver.name == "hello-2.12.drv"
    assert info.sigs == (f"cache.nixos.org-1:{'A' * 86}==",)
    assert info.ca is not None
    assert info.ca.startswith("fixed:r:sha256:")
    assert info.render() == SAMPLE


def test_nix_defaults_and_unknown_fields() -> None:
    text = (
        f"StorePath: /nix/store/{H1}-x\nURL: nar/a.nar.bz2\nNarHash: {NAR_HASH.sri}\n"
        "NarSize: 8\nSystem: x86_64-linux\nDeriver: unknown-deriver\n"
    )
    info = NarInfo.parse(text)
    assert info.compression == "bzip2"  # what Nix assumes when the field is missing
    assert info.deriver is None
    assert info.references == ()
    assert info.extra == (("System", "x86_64-linux"),)
    assert "System: x86_64-linux\n" in info.render()
    assert NarInfo.parse(info.render()) == info


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda t: t.replace("StorePath: ", "Storepath: "), "StorePath"),
        (lambda t: t.replace("NarHash: sha256:", "NarHash: md5:"), "invalid narinfo"),
        (lambda t: t.replace("NarSize: 226560", "NarSize: -1"), "not a number"),
        (lambda t: t.replace("FileSize: 50264", "FileSize: 1e3"), "not a number"),
        (lambda t: t.replace("NarSize: 226560", "NarSize: 1\nNarSize: 2"), "repeats"),
        (lambda t: t.replace(f"References: {H2}", "References: ../etc"), "invalid narinfo"),
        (lambda t: t.replace("URL: nar/", "URL nar/"), "invalid narinfo line"),
        (lambda t: t.replace("StorePath: /nix/store/", "StorePath: /tmp/"), "invalid narinfo"),
        (lambda t: t.replace("URL: ", "URL:"), None),  # tolerated: no space
    ],
)
def test_broken_documents(change: Callable[[str], str], match: str | None) -> None:
    text = change(SAMPLE)
    if match is None:
        assert NarInfo.parse(text).url.startswith("nar/")
        return
    with pytest.raises(NarinfoError, match=match):
        NarInfo.parse(text)


def test_alternate_store_dir() -> None:
    text = SAMPLE.replace("/nix/store/", "/gnu/store/")
    info = NarInfo.parse(text, store_dir="/gnu/store")
    assert str(info.store_path).startswith("/gnu/store/")
    assert info.render() == text


def test_sign_and_check() -> None:
    key = SecretKey.generate("k-1")
    info = NarInfo.parse(SAMPLE).signed(key)
    trusted = TrustedKeys([key.public_key])
    assert info.check_signature(trusted) == info.sigs[-1]
    assert info.signed(key).sigs == info.sigs  # re-signing replaces, not duplicates
    with pytest.raises(SignatureError, match=f"{H1}-hello-2.12: no valid signature"):
        replace(info, nar_hash=Hash.of(b"other")).check_signature(trusted)
    with pytest.raises(SignatureError, match="no signatures"):
        replace(info, sigs=()).check_signature(trusted)


@pytest.mark.nix
def test_round_trips_what_nix_copy_writes(
    built_closure: BuiltClosure,
    make_file_cache: Callable[..., FileCache],
    cache_key: CacheKey,
) -> None:
    cache = make_file_cache([built_closure.app], "zstd")
    files = sorted(cache.dir.glob("*.narinfo"))
    assert len(files) == len(built_closure.infos) == 3
    for file in files:
        text = file.read_text()
        info = NarInfo.parse(text)
        assert info.render() == text
        expected = built_closure.infos[str(info.store_path)]
        assert (info.nar_hash, info.nar_size) == (expected.nar_hash, expected.nar_size)
        assert info.references == expected.references
        info.check_signature(cache_key.trusted)


_LINES = SAMPLE.splitlines()


@given(st.text(max_size=400))
def test_fuzz_random_text(text: str) -> None:
    with contextlib.suppress(NarinfoError):
        NarInfo.parse(text)


@given(
    st.lists(
        st.one_of(
            st.sampled_from(_LINES),
            st.text(max_size=60),
            st.sampled_from(_LINES).map(lambda line: line[: len(line) // 2]),
        ),
        max_size=14,
    )
)
def test_fuzz_recombined_lines(lines: list[str]) -> None:
    try:
        info = NarInfo.parse("\n".join(lines))
    except NarinfoError:
        return
    assert NarInfo.parse(info.render()) == info
