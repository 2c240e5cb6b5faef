"""Who holds which store path, as state: the layout of the `niphas-holders` bucket.

`path.available` events say what happened and may expire; the bucket keeps each holder's
latest word about each path with no age limit, one key per (path, holder):

    <hash part>.node.<node name>     a node's word: a `PathAvailable` body (available,
                                     fetching or failed); deleted when withdrawn
    <hash part>.cache.<url digest>   a cache's word (the builder's, per pushed path)
    node.<node name>                 a node's own word about itself: a `NodeRecord`, the URL
                                     its agent serves at, rewritten while it serves (a
                                     heartbeat), `serving: false` once it stopped

A node's path records count only at the URL its `NodeRecord` names, while that record says it
serves and is fresh, so a record naming some other address for a node (forged, or left by an
earlier run at another address) is never fetched from, nor a node that stopped or vanished.
Readers check every record against its key (`path_key` of the body must be the key) and skip
the ones that do not match."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Final, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from niphas_schemas.types import NodeId

HOLDERS_BUCKET: Final = "niphas-holders"
STORE_DIR: Final = "/nix/store/"
HASH_LEN: Final = 32

HolderKind = Literal["node", "cache"]


def hash_part(store_path: str) -> str:
    """`/nix/store/<hash>-name` -> `<hash>`."""
    return store_path.removeprefix(STORE_DIR)[:HASH_LEN]


def holder_id(kind: HolderKind, holder: str, url: str) -> str:
    """A node is one holder whatever its URL; a cache is one holder per URL."""
    if kind == "node":
        return f"node.{holder}"
    return f"cache.{hashlib.sha256(url.encode()).hexdigest()[:32]}"


def path_key(store_path: str, kind: HolderKind, holder: str, url: str) -> str:
    return f"{hash_part(store_path)}.{holder_id(kind, holder, url)}"


def node_key(node: str) -> str:
    return f"node.{node}"


def split_key(key: str) -> tuple[str, str] | None:
    """A path record's key -> (hash part, holder id); None for any other key."""
    head, _, rest = key.partition(".")
    if len(head) != HASH_LEN or not rest.startswith(("node.", "cache.")):
        return None
    return head, rest


def node_of_key(key: str) -> str | None:
    """A node record's key -> the node's name; None for any other key."""
    head, _, rest = key.partition(".")
    return rest if head == "node" and rest else None


class NodeRecord(BaseModel):
    """A node's agent, at the URL it serves its binary cache at."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    node: NodeId
    url: str = Field(max_length=2048, pattern=r"^https?://\S+$")
    serving: bool = Field(default=True, description="False: the agent stopped")
    at: AwareDatetime = Field(
        default_factory=lambda: datetime.now(UTC),
        description="When the agent wrote this (it rewrites it while it serves)",
    )
