"""Mapping a workload's flakeRef to the clone URL the pipeline's events carry, and the
program name fallback of a store path (unit tests, no servers)."""

from __future__ import annotations

import pytest

from niphas_operator.flakeref import FlakeRefError, ref_of, repository_of, same_repository
from niphas_operator.workload import program_of, short_store_path


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
    with pytest.raises(FlakeRefError):
        repository_of("path:/srv/app")


def test_ref_of() -> None:
    assert ref_of("git+https://h/x.git?ref=main") == "refs/heads/main"
    assert ref_of("git+https://h/x.git?rev=abc&ref=refs/tags/v1") == "refs/tags/v1"
    assert ref_of("git+https://h/x.git") is None


def test_same_repository_ignores_spelling() -> None:
    assert same_repository("https://GitHub.com/Owner/repo.git", "https://github.com/Owner/repo/")
    assert not same_repository("https://github.com/owner/repo", "https://github.com/owner/rep")


def test_program_of_strips_the_version() -> None:
    assert program_of("/nix/store/" + "a" * 32 + "-hello-2.12.1") == "hello"
    assert program_of("/nix/store/" + "a" * 32 + "-web-server-0.3") == "web-server"
    assert program_of("/nix/store/" + "a" * 32 + "-app") == "app"
    assert short_store_path("/nix/store/" + "abcdefgh" * 4 + "-app-1") == "abcdefg-app-1"
