"""Flake references for a repository at a commit, and the allowlist that guards them.

The repository URL of a push becomes a git flake ref pinned to the pushed commit:
`git+<url>?ref=<ref>&rev=<commit>` (with `allRefs=1` when the ref is unknown, so a commit on
any branch can be fetched). An scp-like `git@host:path` becomes `git+ssh://git@host/path`.
URLs that carry a query or fragment are refused: they could smuggle fetcher attributes
(`rev`, `submodules`, ...) into the flake ref.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from urllib.parse import parse_qs, urlencode

_SCP = re.compile(r"^(?P<user>[^@/\s]+)@(?P<host>[^:/\s]+):(?P<path>\S+)$")
_SCHEMES = ("https://", "http://", "ssh://", "git://", "file://")


class UnusableRepository(ValueError):
    """The repository URL cannot become a git flake ref."""


def git_url(repository: str) -> str:
    """The URL git and Nix's git fetcher use for `repository` (scp-like -> ssh://)."""
    if "?" in repository or "#" in repository:
        raise UnusableRepository(f"{repository}: a repository URL may not carry ? or #")
    if any(seg in (".", "..") for seg in repository.replace(":", "/").split("/")):
        raise UnusableRepository(f"{repository}: `.` and `..` path segments are not allowed")
    scp = _SCP.match(repository)
    if scp is not None:
        path = scp["path"].lstrip("/")
        return f"ssh://{scp['user']}@{scp['host']}/{path}"
    if not repository.startswith(_SCHEMES):
        raise UnusableRepository(f"{repository}: not an http(s), ssh, git or file URL")
    return repository


def base_flake_ref(repository: str) -> str:
    """`git+<url>` with nothing pinned (what the allowlist also matches)."""
    url = git_url(repository)
    return url if url.startswith("git://") else f"git+{url}"


def flake_ref(
    repository: str, *, rev: str, ref: str | None = None, nar_hash: str | None = None
) -> str:
    """A flake ref pinned to `rev` (and fully locked with `nar_hash`)."""
    params: dict[str, str] = {}
    if ref is not None:
        params["ref"] = ref
    else:
        params["allRefs"] = "1"
    params["rev"] = rev
    if nar_hash is not None:
        params["narHash"] = nar_hash
    return f"{base_flake_ref(repository)}?{urlencode(params)}"


def with_ref(repository: str, locked: str, ref: str | None) -> str:
    """The locked flake ref `locked` (of `repository`, made by `flake_ref`) naming `ref`
    instead: the same commit and narHash reached through another push's ref, which still
    exists when the first one's branch is gone."""
    params = parse_qs(locked.partition("?")[2])
    rev = params.get("rev")
    if not rev:
        return locked
    nar_hash = params.get("narHash")
    return flake_ref(repository, rev=rev[0], ref=ref, nar_hash=nar_hash[0] if nar_hash else None)


@dataclass(frozen=True)
class Allowlist:
    """Deny by default: a repository is evaluated only when one glob matches its URL or its
    flake ref (`git+<url>`). Globs are fnmatch's, case-sensitive; `*` also matches `/`."""

    patterns: tuple[str, ...]

    def allows(self, repository: str) -> bool:
        try:
            candidates = (repository, git_url(repository), base_flake_ref(repository))
        except UnusableRepository:
            return False
        return any(fnmatchcase(c, p) for p in self.patterns for c in candidates)

    def allows_input(self, url: str) -> bool:
        """Whether a flake input fetched from `url` (a git, tarball or file URL) is allowed:
        the same globs over `url` or `git+<url>`. A query is fine here (archive URLs carry
        one); `.`/`..` segments are not (the fetcher would resolve them past a glob)."""
        path = url.partition("?")[0]
        if any(seg in (".", "..") for seg in path.split("/")):
            return False
        return any(fnmatchcase(c, p) for p in self.patterns for c in (url, f"git+{url}"))

    def uri_prefixes(self) -> tuple[str, ...]:
        """Nix's `allowed-uris` for `restrict-eval`: for each glob its literal part up to the
        last `/`, plain and with `git+`. Coarser than the globs (a second fence: fetches that
        evaluation itself makes, such as `builtins.fetchurl` with a hash, are refused unless
        they go to an allowlisted prefix); the globs check every flake input exactly."""
        prefixes: list[str] = []
        for pattern in self.patterns:
            literal = re.split(r"[*?\[]", pattern, maxsplit=1)[0]
            scp = _SCP.match(literal + "x")
            if scp is not None:  # git@host:path -> ssh://git@host/path
                literal = f"ssh://{scp['user']}@{scp['host']}/{scp['path'][:-1].lstrip('/')}"
            if literal.startswith("path:"):  # store paths an operator allowed by name
                prefixes.append(literal[: literal.rfind("/") + 1])
                continue
            scheme, sep, rest = literal.partition("://")
            if not sep:  # a wildcard before any scheme (`*`): every scheme is allowed
                prefixes += [s for s in _SCHEMES + tuple(f"git+{s}" for s in _SCHEMES)]
                continue
            rest = rest[: rest.rfind("/") + 1] if "/" in rest else ""
            base = f"{scheme}://{rest}"
            for prefix in (base, base.removeprefix("git+"), "git+" + base.removeprefix("git+")):
                if prefix not in prefixes:
                    prefixes.append(prefix)
        return tuple(prefixes)

    def reason(self, repository: str) -> str:
        if not self.patterns:
            return (
                f"{repository} is not allowed: the allowlist is empty (deny by default; set "
                "NIPHAS_EVAL_ALLOWED_REFS)"
            )
        return f"{repository} matches no pattern of NIPHAS_EVAL_ALLOWED_REFS"
