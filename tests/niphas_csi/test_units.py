"""Narrow units: request validation (store paths, targets, volume ids, the workload's binary
cache attributes) and mountinfo parsing (octal escapes in mount points) without mounting
anything."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from niphas_common.bus.codec import decode, encode
from niphas_csi.errors import InvalidRequest
from niphas_csi.mounts import parse_mountinfo
from niphas_csi.request import (
    parse_binary_cache,
    parse_store_paths,
    validate_target,
    validate_volume_id,
)
from niphas_schemas import PathWanted

GOOD = "/nix/store/0c4wjd5a2m2q1fmbj1m2vzvyw2lp4ab6-hello-2.12"
OTHER = "/nix/store/1c4wjd5a2m2q1fmbj1m2vzvyw2lp4ab6-lib"


def test_store_paths_split_on_commas_and_whitespace_sorted_unique() -> None:
    assert parse_store_paths(f" {OTHER},{GOOD}\n{OTHER} ") == (GOOD, OTHER)


@pytest.mark.parametrize(
    "value",
    [
        "/nix/store/short-hello",
        "/nix/store/0c4wjd5a2m2q1fmbj1m2vzvyw2lp4abe-hello",  # 'e' is not nix32
        "/nix/store/0c4wjd5a2m2q1fmbj1m2vzvyw2lp4ab6-.hidden",
        f"{GOOD}/bin/hello",
        "/tmp/0c4wjd5a2m2q1fmbj1m2vzvyw2lp4ab6-hello",
        "../../etc",
    ],
)
def test_bad_store_paths_are_named(value: str) -> None:
    with pytest.raises(InvalidRequest, match="is not a store path"):
        parse_store_paths(f"{GOOD} {value}")


def test_target_must_stay_under_the_root_even_through_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "pods"
    (root / "pod").mkdir(parents=True)
    assert validate_target(str(root / "pod" / "mount"), root) == str(root / "pod" / "mount")
    (root / "escape").symlink_to(tmp_path)
    with pytest.raises(InvalidRequest, match="outside the allowed root"):
        validate_target(str(root / "escape" / "mount"), root)
    with pytest.raises(InvalidRequest, match="outside the allowed root"):
        validate_target(str(root), root)


@pytest.mark.parametrize("volume_id", ["", "../x", "a/b", ".hidden", "x" * 129])
def test_volume_ids_must_be_plain_names(volume_id: str) -> None:
    with pytest.raises(InvalidRequest):
        validate_volume_id(volume_id)


KEY = "cache.example-1:" + "A" * 43 + "="


def test_binary_cache_attributes_are_optional_and_passed_as_given() -> None:
    assert parse_binary_cache({}) == (None, None)
    assert parse_binary_cache({"binaryCache": "", "binaryCachePublicKey": ""}) == (None, None)
    attributes = {"binaryCache": "https://cache.example/team", "binaryCachePublicKey": KEY}
    assert parse_binary_cache(attributes) == ("https://cache.example/team", KEY)


@pytest.mark.parametrize(
    ("attributes", "named"),
    [
        ({"binaryCache": "s3://bucket"}, "'binaryCache': 's3://bucket' is not an http(s):// URL"),
        ({"binaryCache": "file:///srv/cache"}, "'binaryCache'"),
        ({"binaryCache": "https://c.example/../x"}, "no '.' or '..' segments"),
        ({"binaryCache": "https://user@c.example"}, "'binaryCache'"),
        ({"binaryCache": "https://c.example", "binaryCachePublicKey": "nokey"},
         "'binaryCachePublicKey': 'nokey' is not a Nix public key name:base64"),
        ({"binaryCachePublicKey": KEY}, "'binaryCachePublicKey' is set without 'binaryCache'"),
    ],
)  # fmt: skip
def test_bad_binary_cache_attributes_are_named(attributes: dict[str, str], named: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_binary_cache(attributes)
    assert named in str(err.value)


def test_a_want_naming_no_cache_is_written_as_before() -> None:
    """So an agent of the previous release, which forbids unknown fields, still takes it."""
    deadline = datetime.now(UTC)
    plain = PathWanted(node="n1", store_paths=(GOOD,), deadline=deadline, requester="csi:v")
    assert "binary_cache" not in json.loads(encode(plain))
    own = plain.model_copy(
        update={"binary_cache": "https://c.example", "binary_cache_public_key": KEY}
    )
    body = json.loads(encode(own))
    assert (body["binary_cache"], body["binary_cache_public_key"]) == ("https://c.example", KEY)
    assert decode(PathWanted, encode(own)) == own
    assert own.idempotency_key != plain.idempotency_key


def test_mountinfo_unescapes_paths() -> None:
    line = (
        "36 35 98:0 / /var/lib/kubelet/pods/a\\040b/mount rw,nosuid,nodev shared:1 - overlay "
        "niphas-csi ro,lowerdir=/x:/nix\n"
    )
    [info] = parse_mountinfo(line)
    assert info.mount_point == "/var/lib/kubelet/pods/a b/mount"
    assert info.source == "niphas-csi"
    assert info.fstype == "overlay"
    assert {"rw", "nosuid", "nodev"} == info.options
