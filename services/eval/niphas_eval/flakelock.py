"""The pushed flake's flake.lock, checked against the allowlist and embedded in the wrapper's.

Nix fetches a flake's inputs from wherever its flake.nix or flake.lock says: a `path:` input
copies any host directory into the evaluation, a URL input reaches any server. So the pushed
commit's committed flake.lock is read first (see `Evaluator.source`) and every node of it is
checked here: its `locked` ref (what Nix fetches) must be a git, tarball or file URL, or a
github/gitlab/sourcehut repository, that `NIPHAS_EVAL_ALLOWED_REFS` allows; `path:` inputs
are refused (host files) unless they name a store path a glob allows as `path:/nix/store/..`
(the operator's own tools); `indirect` (registry lookups), git submodules (their URLs come
from .gitmodules, unchecked) and any other type are refused, naming the input.

The checked nodes then become the wrapper flake's own lock, under its input `target`. Nix keeps
a lock entry whose `original` matches the declared input without reading that flake's
flake.nix again (Nix 2.8 `lockFlake`), so with `--no-update-lock-file` evaluation fetches
exactly these nodes: an input declared in flake.nix but missing from (or stale in) the
committed flake.lock is never fetched from its declared URL; the flake's `outputs` is simply
called without it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from niphas_eval.flakeref import Allowlist
from niphas_schemas.types import STORE_DIR

MAX_LOCK_BYTES = 1024 * 1024
"""Largest flake.lock read (a lock with thousands of inputs is ~1 MB): more is refused."""
LOCK_VERSIONS = (5, 6, 7)
"""Lock formats whose nodes look alike (Nix 2.4 and later write 7)."""
_FORGES = {"github": "github.com", "gitlab": "gitlab.com", "sourcehut": "git.sr.ht"}


class InputRefused(Exception):
    """An input of the pushed flake may not be fetched; the message names it."""


@dataclass(frozen=True)
class Target:
    """The pushed commit as a lock node: what the wrapper declares and what was fetched."""

    url: str
    """The git URL without `git+` (as Nix stores it in a lock)."""
    params: dict[str, str]
    """The pinned flake ref's query: rev, and ref or allRefs."""
    fetched: dict[str, Any]
    """narHash, lastModified, revCount of the fetched source."""

    def original(self) -> dict[str, Any]:
        # Nix parses `allRefs=1` (like submodules, shallow) into a boolean.
        attrs = {k: (v == "1" if k == "allRefs" else v) for k, v in self.params.items()}
        return {"type": "git", "url": self.url, **attrs}

    def locked(self) -> dict[str, Any]:
        return {**self.original(), **self.fetched}


def target_of(pinned: str, fetched: dict[str, Any]) -> Target:
    """`pinned` (git+<url>?...rev=..) with what `builtins.fetchTree` said about it."""
    url, _, query = pinned.removeprefix("git+").partition("?")
    kept: dict[str, Any] = {
        k: fetched[k] for k in ("narHash", "lastModified", "revCount") if fetched.get(k) is not None
    }
    return Target(url, dict(parse_qsl(query)), kept)


def parse_lock(text: str | None) -> dict[str, Any]:
    """The committed flake.lock (an empty one when there is none)."""
    if text is None:
        return {"nodes": {"root": {}}, "root": "root", "version": 7}
    if len(text.encode()) > MAX_LOCK_BYTES:
        raise InputRefused(f"flake.lock is larger than {MAX_LOCK_BYTES} bytes")
    try:
        lock = json.loads(text)
        nodes, root = lock["nodes"], lock["root"]
        if not isinstance(nodes, dict) or root not in nodes:
            raise TypeError("no root node")
    except (ValueError, KeyError, TypeError) as exc:
        raise InputRefused(f"flake.lock is not a usable lock file: {exc}") from None
    if lock.get("version") not in LOCK_VERSIONS:
        raise InputRefused(f"flake.lock version {lock.get('version')!r} is not supported")
    return dict(lock)


def input_urls(lock: dict[str, Any]) -> list[str]:
    """The URLs the inputs of a checked lock (`check_nodes`) fetch from."""
    return [
        input_url(node["locked"])
        for name, node in lock["nodes"].items()
        if name != lock["root"] and isinstance(node.get("locked"), dict)
    ]


def input_url(attrs: dict[str, Any]) -> str:
    """The URL a lock node's attributes fetch from, for the allowlist; InputRefused when
    that input type reads host files, asks a registry, or is unknown."""
    kind = attrs.get("type")
    if kind == "path":
        # Host files never; a store path only when a glob names it (`path:/nix/store/...`):
        # store contents are immutable, but they include other repositories' sources.
        path = str(attrs.get("path"))
        if not path.startswith(f"{STORE_DIR}/") or "/.." in path:
            raise InputRefused(f"a `path:` input ({path}) reads host files")
        return f"path:{path}"
    if kind == "indirect":
        raise InputRefused(f"an indirect input ({attrs.get('id')}) is resolved by a registry")
    if kind in ("git", "tarball", "file"):
        if kind == "git" and attrs.get("submodules"):
            raise InputRefused("git submodules are fetched from unchecked .gitmodules URLs")
        url = attrs.get("url")
        if not isinstance(url, str):
            raise InputRefused(f"a {kind} input without a url")
        return url
    if kind in _FORGES:
        host = attrs.get("host") or _FORGES[kind]
        return f"https://{host}/{attrs.get('owner')}/{attrs.get('repo')}"
    raise InputRefused(f"input type {kind!r} is not supported")


def check_nodes(lock: dict[str, Any], allowlist: Allowlist) -> list[str]:
    """Check every input node of `lock`. Returns the `allowed-uris` entries its forge inputs
    need beyond the allowlist's prefixes (Nix checks `github:owner/repo/...` itself)."""
    forge_refs: list[str] = []
    for name, node in lock["nodes"].items():
        if name == lock["root"]:
            continue
        try:
            locked = node["locked"]
            url = input_url(locked)
            if isinstance(node.get("original"), dict):
                input_url(node["original"])  # a path: original is refused as well
        except (KeyError, TypeError):
            raise InputRefused(f"input {name!r} of flake.lock is not locked") from None
        except InputRefused as exc:
            raise InputRefused(f"input {name!r}: {exc}") from None
        if not allowlist.allows_input(url):
            raise InputRefused(
                f"input {name!r} ({url}) matches no pattern of NIPHAS_EVAL_ALLOWED_REFS"
            )
        if locked.get("type") in _FORGES:
            forge_refs.append(f"{locked['type']}:{locked.get('owner')}/{locked.get('repo')}")
    return forge_refs


def wrapper_lock(target: Target, lock: dict[str, Any]) -> dict[str, Any]:
    """The wrapper's flake.lock: its root's one input `target` (the pushed commit) with the
    pushed flake's nodes below it. Node names get a `target-` prefix (they may clash with
    `root`); `follows` paths, absolute from the root, gain a leading `target`."""

    def ref(value: Any) -> Any:
        return f"target-{value}" if isinstance(value, str) else ["target", *value]

    root = lock["nodes"][lock["root"]]
    nodes: dict[str, Any] = {
        "root": {"inputs": {"target": "target"}},
        "target": {
            "inputs": {k: ref(v) for k, v in (root.get("inputs") or {}).items()},
            "locked": target.locked(),
            "original": target.original(),
        },
    }
    for name, node in lock["nodes"].items():
        if name == lock["root"]:
            continue
        copied = dict(node)
        if "inputs" in copied:
            copied["inputs"] = {k: ref(v) for k, v in copied["inputs"].items()}
        nodes[f"target-{name}"] = copied
    return {"nodes": nodes, "root": "root", "version": lock["version"]}
