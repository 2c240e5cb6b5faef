"""Repositories and the git flake refs that name them: the one rule both ways.

The pipeline speaks of a repository by its clone URL (what a forge's push carries, and what
`eval.done` and `build.done` repeat). Eval turns it into a git flake ref pinned to the pushed
commit; the operator turns a workload's `flakeRef` back into the clone URL to match events:

| flakeRef                          | repository                              |
|-----------------------------------|-----------------------------------------|
| `git+https://host/x.git`          | `https://host/x.git`                    |
| `git+ssh://git@host/x.git`        | `ssh://git@host/x.git`                  |
| `git+file:///srv/x`               | `file:///srv/x`                         |
| `git://host/x.git`                | `git://host/x.git`                      |
| `github:owner/repo`               | `https://github.com/owner/repo.git`     |
| `gitlab:owner/repo`               | `https://gitlab.com/owner/repo.git`     |

From repository to flake ref (`flake_ref`): `git+<url>?ref=<ref>&rev=<commit>` (with
`allRefs=1` when the ref is unknown, so a commit on any branch can be fetched); an scp-like
`git@host:path` becomes `git+ssh://git@host/path`. Repository URLs that carry a query or
fragment are refused: they could smuggle fetcher attributes (`rev`, `submodules`, ...) in.

From flake ref to repository (`repository_of`): query parameters (`?ref=`, `?dir=`) and
fragments are dropped. Matching compares `same_repository` forms: scheme and host lowercased,
a trailing `.git` and `/` ignored.

A workload follows one ref (`spec.ref`, else the flakeRef's `?ref=`), or, naming none, the
default branch. A forge's push names its branch but not which branch is the default, so
`same_branch` takes `DEFAULT_BRANCHES` as the default branch, and an event naming no ref (a
push that named none) as a push to it.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

DEFAULT_BRANCHES = ("refs/heads/main", "refs/heads/master")
"""What a workload naming no ref follows; any other default branch is named in `spec.ref`."""

SCHEMES = ("https://", "http://", "ssh://", "git://", "file://")
"""The URL schemes of a git repository the pipeline evaluates."""
SCP_LIKE = re.compile(r"^(?P<user>[^@/\s]+)@(?P<host>[^:/\s]+):(?P<path>\S+)$")
"""`git@host:path`, git's shorthand for an ssh URL."""

_FORGE_SHORTHANDS = {"github": "https://github.com", "gitlab": "https://gitlab.com"}
_SHORTHAND = re.compile(r"^(github|gitlab):([A-Za-z0-9_.\-]+)/([A-Za-z0-9_.\-]+)(?:/[^?#]*)?")


class UnusableRepository(ValueError):
    """A repository URL that cannot become a git flake ref, or a flakeRef naming no git
    repository the pipeline can evaluate."""


# -- repository -> flake ref -------------------------------------------------------------------


def git_url(repository: str) -> str:
    """The URL git and Nix's git fetcher use for `repository` (scp-like -> ssh://)."""
    if "?" in repository or "#" in repository:
        raise UnusableRepository(f"{repository}: a repository URL may not carry ? or #")
    if any(seg in (".", "..") for seg in repository.replace(":", "/").split("/")):
        raise UnusableRepository(f"{repository}: `.` and `..` path segments are not allowed")
    scp = SCP_LIKE.match(repository)
    if scp is not None:
        path = scp["path"].lstrip("/")
        return f"ssh://{scp['user']}@{scp['host']}/{path}"
    if not repository.startswith(SCHEMES):
        raise UnusableRepository(f"{repository}: not an http(s), ssh, git or file URL")
    return repository


def base_flake_ref(repository: str) -> str:
    """`git+<url>` with nothing pinned (what the eval allowlist also matches)."""
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


# -- flake ref -> repository -------------------------------------------------------------------


def repository_of(flake_ref: str) -> str:
    """The clone URL for a flakeRef (see the table above)."""
    shorthand = _SHORTHAND.match(flake_ref)
    if shorthand:
        forge, owner, repo = shorthand.groups()
        repo = repo.removesuffix(".git")
        return f"{_FORGE_SHORTHANDS[forge]}/{owner}/{repo}.git"
    parts = urlsplit(flake_ref.removeprefix("git+"))
    if f"{parts.scheme}://" not in SCHEMES or not parts.path:
        raise UnusableRepository(f"no git repository in flakeRef {flake_ref!r}")
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
