"""nix32 encoding and hash spellings: known vectors, agreement with the real `nix hash`
converters, hypothesis round trips, and rejection of malformed input with HashError only."""

from __future__ import annotations

import contextlib
import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from niphas_common.nix import nix32
from niphas_common.nix.errors import HashError, VerificationError
from niphas_common.nix.hashes import Hash, HashSink, NarVerifier
from niphas_common.nix.runner import NixRunner

# sha256("") as Nix prints it (a fact anyone can reproduce with `nix hash file /dev/null`).
EMPTY_SHA256_NIX32 = "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"


def test_known_vector() -> None:
    digest = hashlib.sha256(b"").digest()
    assert nix32.encode(digest) == EMPTY_SHA256_NIX32
    assert nix32.decode(EMPTY_SHA256_NIX32) == digest


def test_lengths() -> None:
    assert [nix32.encoded_len(n) for n in (16, 20, 32, 64)] == [26, 32, 52, 103]
    assert nix32.encode(b"") == ""


@given(st.binary(max_size=80))
def test_nix32_round_trip(data: bytes) -> None:
    text = nix32.encode(data)
    assert len(text) == nix32.encoded_len(len(data))
    assert nix32.decode(text) == data


@pytest.mark.parametrize(
    "bad",
    [
        "e" * 52,  # e is not in the alphabet
        "0" * 51,  # no byte length encodes to 51 characters
        "z" * 52,  # overflows 32 bytes
    ],
)
def test_nix32_rejects(bad: str) -> None:
    with pytest.raises(HashError):
        nix32.decode(bad)


@given(st.text(max_size=120))
def test_nix32_decode_fuzz(text: str) -> None:
    with contextlib.suppress(HashError):
        nix32.decode(text)


@given(st.binary(min_size=32, max_size=32))
def test_hash_spellings_round_trip(digest: bytes) -> None:
    h = Hash("sha256", digest)
    for spelling in (h.sri, h.nix32, h.base16, f"sha256:{h.sri.split('-', 1)[1]}"):
        assert Hash.parse(spelling) == h
    assert Hash.parse(h.hex, algo="sha256") == h


@pytest.mark.parametrize(
    "bad",
    ["sha256:xyz", "md4:abcd", "sha256-!!!!", "abcdef", "sha1:" + "0" * 52, "sha256-AAAA"],
)
def test_hash_parse_rejects(bad: str) -> None:
    with pytest.raises(HashError):
        Hash.parse(bad)


def test_expected_algo_enforced() -> None:
    with pytest.raises(HashError, match="expected a sha512"):
        Hash.parse(Hash.of(b"x").sri, algo="sha512")


def test_hash_sink_counts_and_hashes() -> None:
    sink = HashSink()
    for part in (b"abc", bytearray(b"def"), memoryview(b"ghi")):
        sink.update(part)
    assert sink.size == 9
    assert sink.hash() == Hash.of(b"abcdefghi")


@pytest.mark.nix
def test_conversions_agree_with_nix(nix_runner: NixRunner) -> None:
    hashes = [Hash.of(bytes([i]) * i) for i in range(5)] + [Hash.of(b"x", "sha512")]
    sri = nix_runner.run("nix", "hash", "to-sri", *(h.base16 for h in hashes)).text.split()
    assert sri == [h.sri for h in hashes]
    b32 = nix_runner.run("nix", "hash", "to-base32", *(h.sri for h in hashes)).text.split()
    assert b32 == [h.nix32.split(":", 1)[1] for h in hashes]
    b16 = nix_runner.run("nix", "hash", "to-base16", *(h.nix32 for h in hashes)).text.split()
    assert b16 == [h.hex for h in hashes]


def test_nar_verifier() -> None:
    data = b"x" * 100
    ok = NarVerifier(Hash.of(data), 100, "/nix/store/p")
    ok.update(data[:60])
    ok.update(data[60:])
    ok.finish()
    longer = NarVerifier(Hash.of(data), 99, "/nix/store/p")
    with pytest.raises(VerificationError, match="/nix/store/p: NAR larger"):
        longer.update(data)
    shorter = NarVerifier(Hash.of(data), 100, "/nix/store/p")
    shorter.update(data[:99])
    with pytest.raises(VerificationError, match="NarSize 99 != 100"):
        shorter.finish()
    other = NarVerifier(Hash.of(data), 100, "/nix/store/p")
    other.update(b"y" * 100)
    with pytest.raises(VerificationError, match="NarHash mismatch"):
        other.finish()
