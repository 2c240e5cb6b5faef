"""The workload's derived names: the program name fallback of a store path (what Nix's
`lib.getExe` uses) and the printer column's short store path (unit tests, no servers)."""

from __future__ import annotations

from niphas_operator.workload import program_of, short_store_path


def test_program_of_strips_the_version() -> None:
    assert program_of("/nix/store/" + "a" * 32 + "-hello-2.12.1") == "hello"
    assert program_of("/nix/store/" + "a" * 32 + "-web-server-0.3") == "web-server"
    assert program_of("/nix/store/" + "a" * 32 + "-app") == "app"
    assert short_store_path("/nix/store/" + "abcdefgh" * 4 + "-app-1") == "abcdefg-app-1"
