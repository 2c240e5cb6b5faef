"""Validated scalar types shared by every event: store paths, hashes, commits, node ids.

Events always carry *logical* store paths (`/nix/store/...`), even for nodes whose store
lives under another root (`--store DIR` is a chroot store with the same logical paths).
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, Field, StringConstraints, WithJsonSchema

NIX32_ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
"""Nix's base-32 alphabet: digits and lowercase letters without e, o, t, u."""

STORE_DIR = "/nix/store"
HASH_PART_LEN = 32
MAX_NAME_LEN = 211
"""Nix refuses store path names longer than this."""

_NIX32 = f"[{NIX32_ALPHABET}]"
_NAME_CHARS = r"[A-Za-z0-9+\-._?=]"
STORE_PATH_RE = re.compile(rf"^{STORE_DIR}/({_NIX32}{{{HASH_PART_LEN}}})-({_NAME_CHARS}+)$")
SHA256_NIX32_RE = re.compile(rf"^sha256:{_NIX32}{{52}}$")
_NAME_RE = re.compile(rf"^{_NAME_CHARS}+$")
_HASH_PART_RE = re.compile(rf"^{_NIX32}{{{HASH_PART_LEN}}}$")

# Nix's rules for store paths, written once: the event types below and
# `niphas_common.nix.store_path` both ask these.


def name_problem(name: str) -> str | None:
    """Why Nix refuses `name` (the part after `<hash>-`) as a store path name; None if not."""
    if not name:
        return "store path name is empty"
    if len(name) > MAX_NAME_LEN:
        return f"store path name longer than {MAX_NAME_LEN} characters: {name!r}"
    if name.startswith("."):
        # Nix forbids this so that names can never be `.` or `..` or hidden files.
        return f"store path name must not start with '.': {name!r}"
    if not _NAME_RE.match(name):
        return f"store path name has characters Nix forbids: {name!r}"
    return None


def hash_part_problem(hash_part: str) -> str | None:
    """Why `hash_part` is not the 32-character nix32 hash part of a store path; None if it is."""
    return None if _HASH_PART_RE.match(hash_part) else f"not a store path hash part: {hash_part!r}"


def _check_store_path(value: str) -> str:
    match = STORE_PATH_RE.match(value)
    if match is None:
        raise ValueError(
            f"not a store path: {value!r} (expected {STORE_DIR}/<32 nix32 chars>-<name>)"
        )
    if (problem := name_problem(match.group(2))) is not None:
        raise ValueError(problem)
    return value


def _check_drv_path(value: str) -> str:
    if not value.endswith(".drv"):
        raise ValueError(f"not a derivation path (no .drv suffix): {value!r}")
    return value


_STORE_PATH_SCHEMA = {
    "type": "string",
    "pattern": STORE_PATH_RE.pattern,
    "maxLength": len(STORE_DIR) + 1 + HASH_PART_LEN + 1 + MAX_NAME_LEN,
}

StorePath = Annotated[
    str,
    AfterValidator(_check_store_path),
    WithJsonSchema({**_STORE_PATH_SCHEMA, "description": "An absolute store path"}),
]
"""An absolute logical store path such as /nix/store/<hash>-hello-2.12."""

DrvPath = Annotated[
    str,
    AfterValidator(_check_store_path),
    AfterValidator(_check_drv_path),
    WithJsonSchema(
        {
            **_STORE_PATH_SCHEMA,
            "pattern": STORE_PATH_RE.pattern[:-1] + r"\.drv$",
            "description": "The store path of a derivation",
        }
    ),
]
"""A store path of a derivation (`.drv`)."""

NarHash = Annotated[
    str,
    StringConstraints(pattern=SHA256_NIX32_RE.pattern),
    Field(
        description="SHA-256 of the NAR serialisation, as Nix writes it: sha256:<52 nix32 chars>"
    ),
]

NarSize = Annotated[int, Field(ge=0, description="Size of the NAR serialisation in bytes")]

CommitSha = Annotated[
    str,
    StringConstraints(pattern=r"^([0-9a-f]{40}|[0-9a-f]{64})$"),
    Field(description="A full git commit id (SHA-1 or SHA-256), lowercase hex"),
]

GitRef = Annotated[
    str,
    StringConstraints(pattern=r"^refs/[A-Za-z0-9._/\-]+$", max_length=255),
    Field(description="A fully qualified git ref, e.g. refs/heads/main"),
]

NixSystem = Annotated[
    str,
    StringConstraints(pattern=r"^[a-z0-9_]+-[a-z0-9_]+$", max_length=64),
    Field(description="A Nix system double such as x86_64-linux"),
]

NodeId = Annotated[
    str,
    StringConstraints(pattern=r"^[a-z0-9]([a-z0-9.\-]{0,251}[a-z0-9])?$"),
    Field(description="A Kubernetes node name (DNS-1123 subdomain)"),
]

AttrName = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_'\-]*$", max_length=255),
    Field(description="A Nix attribute name such as `default` or `hello-web`"),
]
