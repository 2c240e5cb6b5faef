"""Ed25519 keys and narinfo signatures against the real Nix: our keys work with `nix`, our
signatures are byte-identical to `nix store sign`'s, we verify Nix's, and a wrong key, a
changed NarHash, NarSize, path or reference list fails verification."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from niphas_common.nix.errors import SignatureError
from niphas_common.nix.hashes import Hash
from niphas_common.nix.narinfo import fingerprint
from niphas_common.nix.runner import NixRunner, PathInfo
from niphas_common.nix.signing import PublicKey, SecretKey, TrustedKeys
from niphas_common.nix.store_path import StorePath
from tests.nix_harness import BuiltClosure, CacheKey


def _fp(info: PathInfo) -> str:
    return fingerprint(info.path, info.nar_hash, info.nar_size, info.references)


@pytest.mark.nix
def test_nix_generated_key_parses(nix_runner: NixRunner, tmp_path: Path) -> None:
    secret = nix_runner.run("nix", "key", "generate-secret", "--key-name", "k-1").text
    public = nix_runner.run("nix", "key", "convert-secret-to-public", input=secret.encode())
    key = SecretKey.parse(secret)
    assert str(key) == secret.strip()
    assert str(key.public_key) == public.text.strip()
    assert PublicKey.parse(public.text) == key.public_key


@pytest.mark.nix
def test_our_key_converts_like_nix(nix_runner: NixRunner, cache_key: CacheKey) -> None:
    public = nix_runner.run(
        "nix", "key", "convert-secret-to-public", input=cache_key.secret_file.read_bytes()
    )
    assert public.text.strip() == str(cache_key.public)


@pytest.mark.nix
def test_signatures_identical_to_nix_store_sign(
    nix_runner: NixRunner, built_closure: BuiltClosure, cache_key: CacheKey
) -> None:
    paths = [str(p) for p in built_closure.paths]
    nix_runner.run("nix", "store", "sign", "--key-file", str(cache_key.secret_file), *paths)
    infos = nix_runner.path_info(paths)
    assert any(info.references for info in infos.values()), "want a path with references"
    for info in infos.values():
        ours = cache_key.secret.sign(_fp(info))
        assert ours in info.signatures
        # ... and we verify the signature Nix made:
        assert cache_key.trusted.valid_signatures(_fp(info), info.signatures) == [ours]


@pytest.mark.nix
def test_tampering_fails_verification(
    nix_runner: NixRunner, built_closure: BuiltClosure, cache_key: CacheKey
) -> None:
    app = built_closure.infos[str(built_closure.app)]
    assert app.references
    sig = cache_key.secret.sign(_fp(app))
    trusted = cache_key.trusted
    assert trusted.valid_signatures(_fp(app), [sig]) == [sig]

    impostor = SecretKey.generate(cache_key.secret.name)  # same name, other key
    other = StorePath.parse(str(built_closure.app).replace(app.path.name, "evil"))
    tampered = {
        "wrong key": (_fp(app), TrustedKeys([impostor.public_key])),
        "NarHash": (_fp(replace(app, nar_hash=Hash.of(b"evil"))), trusted),
        "NarSize": (_fp(replace(app, nar_size=app.nar_size + 8)), trusted),
        "dropped ref": (_fp(replace(app, references=app.references[1:])), trusted),
        "added ref": (_fp(replace(app, references=(*app.references, other))), trusted),
        "path": (_fp(replace(app, path=other)), trusted),
    }
    for what, (fp, keys) in tampered.items():
        assert keys.valid_signatures(fp, [sig]) == [], what


def test_signature_format() -> None:
    key = SecretKey.generate("cache.example.org-1")
    sig = key.sign("1;x")
    name, _, body = sig.partition(":")
    assert name == "cache.example.org-1"
    assert len(body) == 88  # base64 of 64 bytes
    assert key.public_key.verify("1;x", sig)
    assert not key.public_key.verify("1;y", sig)
    assert not key.public_key.verify("1;x", "other:" + body)
    assert not key.public_key.verify("1;x", "garbage")
    assert "key=<hidden>" in repr(key)


@pytest.mark.parametrize(
    "bad",
    ["", "nokey", ":AAAA", "k:not base64!", "k:" + "A" * 44, "k:" + "A" * 88],
)
def test_malformed_keys(bad: str) -> None:
    with pytest.raises(SignatureError):
        SecretKey.parse(bad)
    with pytest.raises(SignatureError):
        PublicKey.parse(bad if bad != "k:" + "A" * 44 else "k:" + "A" * 40)


def test_secret_key_halves_must_agree() -> None:
    a, b = SecretKey.generate("a"), SecretKey.generate("a")
    with pytest.raises(SignatureError, match="does not match"):
        SecretKey("a", a.key[:32] + b.key[32:])


def test_trusted_keys_parse() -> None:
    a, b = SecretKey.generate("a"), SecretKey.generate("b")
    keys = TrustedKeys.parse(f"{a.public_key}  {b.public_key}\n")
    assert sorted(keys) == ["a", "b"]
    assert keys["b"] == b.public_key
    assert keys.valid_signatures("m", [b.sign("m"), a.sign("other")]) == [b.sign("m")]


def test_fingerprint_shape() -> None:
    h = Hash.of(b"x")
    paths = [StorePath.from_base_name(c * 32 + "-p") for c in "10"]
    fp = fingerprint(paths[0], h, 5, paths)
    assert fp == f"1;{paths[0]};{h.nix32};5;{paths[1]},{paths[0]}"
    with pytest.raises(SignatureError):
        fingerprint(paths[0], h, 0, [])
