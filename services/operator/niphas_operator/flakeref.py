"""From a workload's `flakeRef` to the repository clone URL the pipeline speaks of.

The eval service evaluates `git+<repository>?rev=<commit>`, and `build.done` carries the
repository as the forge sent it, so the operator maps each flakeRef to that clone URL:

| flakeRef                          | repository                              |
|-----------------------------------|-----------------------------------------|
| `git+https://host/x.git`          | `https://host/x.git`                    |
| `git+ssh://git@host/x.git`        | `ssh://git@host/x.git`                  |
| `git+file:///srv/x`               | `file:///srv/x`                         |
| `github:owner/repo`               | `https://github.com/owner/repo.git`     |
| `gitlab:owner/repo`               | `https://gitlab.com/owner/repo.git`     |
| `https://host/x.git`              | `https://host/x.git`                    |

Query parameters (`?ref=...`, `?dir=...`) and fragments are dropped. Matching compares
`same_repository` forms: scheme and host lowercased, a trailing `.git` and `/` ignored.

A workload follows one ref (`spec.ref`, else the flakeRef's `?ref=`), or, naming none, the
default branch. A forge's push names its branch but not which branch is the default, so
`same_branch` takes `DEFAULT_BRANCHES` as the default branch, and an event naming no ref (a
push that named none) as a push to it.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

DEFAULT_BRANCHES = ("refs/heads/main", "refs/heads/master")
"""What a workload naming no ref follows; any other default branch is named in `spec.ref`."""

_FORGE_SHORTHANDS = {"github": "https://github.com", "gitlab": "https://gitlab.com"}
_SHORTHAND = re.compile(r"^(github|gitlab):([A-Za-z0-9_.\-]+)/([A-Za-z0-9_.\-]+)(?:/[^?#]*)?")


class FlakeRefError(ValueError):
    """The flakeRef has no repository the pipeline can evaluate."""


def repository_of(flake_ref: str) -> str:
    """The clone URL for a flakeRef (see the table above)."""
    shorthand = _SHORTHAND.match(flake_ref)
    if shorthand:
        forge, owner, repo = shorthand.groups()
        repo = repo.removesuffix(".git")
        return f"{_FORGE_SHORTHANDS[forge]}/{owner}/{repo}.git"
    url = flake_ref.removeprefix("git+")
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http", "ssh", "file", "git") or not parts.path:
        raise FlakeRefError(f"no git repository in flakeRef {flake_ref!r}")
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def ref_of(flake_ref: str) -> str | None:
    """The `?ref=` of a git flakeRef as a full ref (refs/heads/...), if any."""
    query = urlsplit(flake_ref.removeprefix("git+")).query
    for pair in query.split("&"):
        key, _, value = pair.partition("=")
        if key == "ref" and value:
            return value if value.startswith("refs/") else f"refs/heads/{value}"
    return None


def canonical(repository: str) -> str:
    """A form in which two spellings of one repository compare equal."""
    parts = urlsplit(repository.strip())
    path = parts.path.rstrip("/").removesuffix(".git")
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), path, "", ""))


def same_repository(a: str, b: str) -> bool:
    return canonical(a) == canonical(b)


def same_branch(followed: str | None, pushed: str | None) -> bool:
    """Whether a workload following `followed` (None: the default branch) follows a push to
    `pushed` (None: the default branch)."""
    if followed is None or pushed is None:
        named = followed if pushed is None else pushed
        return named is None or named in DEFAULT_BRANCHES
    return followed == pushed
