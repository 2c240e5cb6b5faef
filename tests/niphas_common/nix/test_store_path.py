"""Store path parsing and validation, including alternate store dirs and chroot stores."""

from __future__ import annotations

from pathlib import Path

import pytest

from niphas_common.nix.errors import StorePathError
from niphas_common.nix.store_path import StoreDir, StorePath, validate_name

HASH = "z3f7bycl6yjv3j53dp1rrsy2a0n79fm4"


def test_parse_and_print() -> None:
    sp = StorePath.parse(f"/nix/store/{HASH}-hello-2.12.1")
    assert (sp.hash_part, sp.name, sp.base_name) == (HASH, "hello-2.12.1", f"{HASH}-hello-2.12.1")
    assert str(sp) == f"/nix/store/{HASH}-hello-2.12.1"
    assert not sp.is_derivation
    assert StorePath.parse(f"/nix/store/{HASH}-hello.drv").is_derivation


@pytest.mark.parametrize(
    "bad",
    [
        f"/nix/store/{HASH}",  # no name
        f"/nix/store/{HASH}-",  # empty name
        f"/nix/store/{HASH[:-1]}-x",  # short hash
        f"/nix/store/{HASH[:-1]}e-x",  # e is not nix32
        f"/nix/store/{HASH}-.hidden",
        f"/nix/store/{HASH}-a/b",
        f"/nix/store/{HASH}-sp ace",
        f"/nix/store/{HASH}-" + "a" * 212,
        f"/nix/store/{HASH}-é",
        f"/other/{HASH}-x",
        f"/nix/store/{HASH}-x/",
    ],
)
def test_rejects(bad: str) -> None:
    with pytest.raises(StorePathError):
        StorePath.parse(bad)


def test_name_rules() -> None:
    assert validate_name("a" * 211) == "a" * 211
    assert validate_name("+-._?=Az09") == "+-._?=Az09"
    for bad in ("", ".", "..", "a b", "a:b"):
        with pytest.raises(StorePathError):
            validate_name(bad)


def test_alternate_store_dir() -> None:
    sp = StorePath.parse(f"/var/lib/nix/store/{HASH}-x", store_dir="/var/lib/nix/store")
    assert str(sp) == f"/var/lib/nix/store/{HASH}-x"
    with pytest.raises(StorePathError):
        StorePath.parse(f"/nix/store/{HASH}-x", store_dir="/var/lib/nix/store")


def test_chroot_store_real_path(tmp_path: Path) -> None:
    store = StoreDir(root=tmp_path)
    sp = store.parse(f"/nix/store/{HASH}-x")
    assert store.real_path(sp) == tmp_path / "nix/store" / f"{HASH}-x"
    assert StoreDir().real_path(sp) == Path(f"/nix/store/{HASH}-x")
    assert store.is_store_path(str(sp))
    assert not store.is_store_path("/tmp/x")


def test_orders_by_base_name() -> None:
    a = StorePath.from_base_name("0" * 32 + "-z")
    b = StorePath.from_base_name("1" * 32 + "-a")
    assert sorted([b, a]) == [a, b]
