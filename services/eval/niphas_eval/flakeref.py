"""The allowlist that guards which repositories (and flake inputs) eval may fetch.

How a repository becomes a flake ref is the shared rule in `niphas_common.flakeref` (the
operator maps the other way with it); the names eval's modules take from there are
re-exported here, beside the policy that judges them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase

from niphas_common.flakeref import (
    SCHEMES,
    SCP_LIKE,
    UnusableRepository,
    base_flake_ref,
    flake_ref,
    git_url,
    with_ref,
)

__all__ = ["Allowlist", "UnusableRepository", "base_flake_ref", "flake_ref", "git_url", "with_ref"]


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
            scp = SCP_LIKE.match(literal + "x")
            if scp is not None:  # git@host:path -> ssh://git@host/path
                literal = f"ssh://{scp['user']}@{scp['host']}/{scp['path'][:-1].lstrip('/')}"
            if literal.startswith("path:"):  # store paths an operator allowed by name
                prefixes.append(literal[: literal.rfind("/") + 1])
                continue
            scheme, sep, rest = literal.partition("://")
            if not sep:  # a wildcard before any scheme (`*`): every scheme is allowed
                prefixes += [s for s in SCHEMES + tuple(f"git+{s}" for s in SCHEMES)]
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
