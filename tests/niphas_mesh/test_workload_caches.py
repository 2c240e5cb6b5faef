"""Which binary caches a want may name (`NIPHAS_MESH_WORKLOAD_CACHES`): exact URLs and
prefixes ending in `/` (never a look-alike host or a path beside the prefix), a public key only
if the node already trusts it, and a bad setting refused at start naming the entry. The
fetches these decisions allow or refuse run for real in `test_fetch.py`."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from niphas_common.nix.signing import SecretKey, TrustedKeys
from niphas_mesh.settings import MeshSettings
from niphas_mesh.workload_caches import WorkloadCaches

TRUSTED = SecretKey.generate("cluster-1").public_key
STRANGER = SecretKey.generate("stranger-1").public_key


def caches(text: str) -> WorkloadCaches:
    return WorkloadCaches.parse(text, TrustedKeys([TRUSTED]))


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://exact.example", True),
        ("https://exact.example/", True),
        ("https://exact.example/sub", False),
        ("https://team.example/caches/a", True),
        ("https://team.example/caches", True),
        ("https://team.example/cachesX", False),
        ("https://team.example/other", False),
        ("https://team.example.evil/caches/a", False),
        ("http://team.example/caches/a", False),
    ],
)
def test_exact_urls_and_prefixes_ending_in_a_slash(url: str, allowed: bool) -> None:
    listed = caches("https://exact.example https://team.example/caches/")
    assert listed.allows(url) is allowed
    assert (listed.refusal(url, None) is None) is allowed


def test_nothing_is_allowed_by_default_and_the_refusal_says_how_to_allow() -> None:
    assert MeshSettings().workload_caches == ""
    reason = caches("").refusal("https://x.example", None)
    assert reason is not None
    assert "binary cache https://x.example is not in NIPHAS_MESH_WORKLOAD_CACHES" in reason
    assert caches("").refusal(None, None) is None  # a want naming no cache is never refused


def test_a_public_key_must_already_be_trusted() -> None:
    listed = caches("https://c.example/")
    assert listed.refusal("https://c.example/x", str(TRUSTED)) is None
    reason = listed.refusal("https://c.example/x", str(STRANGER))
    assert reason is not None
    assert str(STRANGER) in reason
    assert "NIPHAS_MESH_TRUSTED_PUBLIC_KEYS" in reason
    # Same name, other key bytes: still a stranger.
    forged = f"cluster-1:{str(STRANGER).split(':')[1]}"
    assert listed.refusal("https://c.example/x", forged) is not None


@pytest.mark.parametrize(
    "entry",
    ["s3://bucket", "file:///srv/cache", "https://u@c.example/", "https://c.example/../",
     "https://c.example/%2e%2e/", "https://c.example/?x=1", "c.example"],
)  # fmt: skip
def test_a_bad_setting_is_refused_naming_the_entry(entry: str) -> None:
    with pytest.raises(ValidationError, match="is not an http"):
        MeshSettings(workload_caches=f"https://ok.example/ {entry}")
