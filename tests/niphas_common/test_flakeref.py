"""The one rule between repositories and git flake refs, both ways: a push's repository
pinned to its commit (what eval evaluates), a workload's flakeRef back to the clone URL the
pipeline's events carry (what the operator matches), and which pushes a followed ref takes.
Unit tests, no servers."""

from __future__ import annotations

import pytest

from niphas_common.flakeref import (
    UnusableRepository,
    flake_ref,
    git_url,
    ref_of,
    repository_of,
    same_branch,
    same_repository,
)


@pytest.mark.parametrize(
    ("flake_ref", "repository"),
    [
        ("git+https://forge.example/team/app.git", "https://forge.example/team/app.git"),
        ("git+https://forge.example/team/app.git?ref=main", "https://forge.example/team/app.git"),
        ("git+ssh://git@forge.example/team/app.git", "ssh://git@forge.example/team/app.git"),
        ("git+file:///srv/git/app", "file:///srv/git/app"),
        ("github:owner/repo", "https://github.com/owner/repo.git"),
        ("github:owner/repo/some-branch", "https://github.com/owner/repo.git"),
        ("gitlab:group/project", "https://gitlab.com/group/project.git"),
        ("https://forge.example/x.git", "https://forge.example/x.git"),
    ],
)
def test_repository_of(flake_ref: str, repository: str) -> None:
    assert repository_of(flake_ref) == repository


def test_not_a_repository() -> None:
    with pytest.raises(UnusableRepository):
        repository_of("path:/srv/app")


def test_ref_of() -> None:
    assert ref_of("git+https://h/x.git?ref=main") == "refs/heads/main"
    assert ref_of("git+https://h/x.git?rev=abc&ref=refs/tags/v1") == "refs/tags/v1"
    assert ref_of("git+https://h/x.git") is None


def test_same_repository_ignores_spelling() -> None:
    assert same_repository("https://GitHub.com/Owner/repo.git", "https://github.com/Owner/repo/")
    assert not same_repository("https://github.com/owner/repo", "https://github.com/owner/rep")


def test_flake_refs_pin_the_commit() -> None:
    sha = "c" * 40
    assert flake_ref("https://git.example/acme/app.git", rev=sha, ref="refs/heads/main") == (
        f"git+https://git.example/acme/app.git?ref=refs%2Fheads%2Fmain&rev={sha}"
    )
    assert flake_ref("file:///srv/app", rev=sha) == f"git+file:///srv/app?allRefs=1&rev={sha}"
    assert git_url("git@git.example:acme/app.git") == "ssh://git@git.example/acme/app.git"
    locked = flake_ref("file:///srv/app", rev=sha, ref="refs/heads/x", nar_hash="sha256-ab+/=")
    assert locked.endswith("&narHash=sha256-ab%2B%2F%3D")
    for bad in ("https://x/a?rev=" + sha, "https://x/a#frag", "file:///srv/git/../etc", "/srv/a"):
        with pytest.raises(UnusableRepository):
            git_url(bad)


def test_a_flake_ref_maps_back_to_its_repository() -> None:
    for repository in ("https://h/x.git", "ssh://git@h/x.git", "file:///srv/x", "git://h/x.git"):
        assert repository_of(flake_ref(repository, rev="c" * 40)) == repository
    assert repository_of(flake_ref("git@h:x.git", rev="c" * 40)) == "ssh://git@h/x.git"


def test_same_branch_takes_main_or_master_as_the_default() -> None:
    assert same_branch(None, None) and same_branch(None, "refs/heads/main")
    assert same_branch("refs/heads/master", None)
    assert not same_branch(None, "refs/heads/dev")
    assert same_branch("refs/heads/dev", "refs/heads/dev")
