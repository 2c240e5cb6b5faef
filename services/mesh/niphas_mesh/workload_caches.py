"""Which binary caches a want may name (`NIPHAS_MESH_WORKLOAD_CACHES`), Nix's own model.

The node's store is shared by every workload on the node, so what one workload brings in,
all of them may run. As in Nix, where `trusted-substituters` and `trusted-public-keys` are the
administrator's and a user may only pick among them, a workload's `spec.binaryCache` (passed
in its want) is used only if the node's administrator listed it, by exact URL or by a prefix
ending in `/`; and a public key the workload names must already be one of the node's trusted
keys. An allowed cache is one more transport: what it serves is still verified like anything
else (a signature by a trusted key and the NAR hash, or a source proving itself by content).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from niphas_common.nix.errors import SignatureError
from niphas_common.nix.signing import PublicKey, TrustedKeys

SETTING = "NIPHAS_MESH_WORKLOAD_CACHES"
_ENTRY = re.compile(r"^https?://[^\s?#@/]+(/[^\s?#@]*)?$")


def check_entries(text: str) -> str:
    """The setting's value, if every entry is an http(s) URL or URL prefix (else ValueError)."""
    for entry in text.split():
        parts = entry.split("://", 1)[-1].split("/")
        if not _ENTRY.match(entry) or "%" in entry or any(p in (".", "..") for p in parts):
            raise ValueError(
                f"{entry!r} is not an http(s) URL or URL prefix ending in '/' (no query, user "
                "info, '.' or '..' segments, or percent-escapes)"
            )
    return text


class WorkloadCaches:
    """The caches workloads may name on this node, and the keys it trusts."""

    def __init__(self, allowed: Iterable[str], trusted: TrustedKeys) -> None:
        self.allowed = tuple(allowed)
        self.trusted = trusted

    @classmethod
    def parse(cls, text: str, trusted: TrustedKeys) -> WorkloadCaches:
        return cls(check_entries(text).split(), trusted)

    def allows(self, url: str) -> bool:
        """Whether `url` is listed: exactly (a trailing `/` aside), or under a listed prefix
        ending in `/` (so `https://cache.example/` never admits `https://cache.example.evil`)."""
        for entry in self.allowed:
            if entry.endswith("/"):
                if (url.rstrip("/") + "/").startswith(entry):
                    return True
            elif url.rstrip("/") == entry.rstrip("/"):
                return True
        return False

    def refusal(self, url: str | None, public_key: str | None) -> str | None:
        """Why a want naming cache `url` (and its `public_key`) must fail here; None: it may."""
        if url is None:
            return None
        if not self.allows(url):
            listed = " ".join(self.allowed) or "empty: no workload may name a cache"
            return f"binary cache {url} is not in {SETTING} ({listed})"
        if public_key is None:
            return None
        try:
            key = PublicKey.parse(public_key)
        except SignatureError as exc:
            return f"public key {public_key} of binary cache {url} is malformed: {exc}"
        if self.trusted.get(key.name) != key:
            return (
                f"public key {public_key} of binary cache {url} is not trusted on this node: "
                "add it to NIPHAS_MESH_TRUSTED_PUBLIC_KEYS to accept paths it signed"
            )
        return None
