"""Real derivations to test against: `nix-instantiate`d into the host store from an
expression with sources (`builtins.path`, `fetchGit` of a local repository, a
`builtins.toFile` text referring to another path), several outputs, a fixed-output
derivation and strings full of characters ATerm escapes."""

from __future__ import annotations

import subprocess
from pathlib import Path

from niphas_common.nix.runner import NixRunner
from tests.nix_harness import nix_system

EXPR = r"""
let
  system = "@SYSTEM@";
  src = builtins.path { path = ./tree; name = "tree-@SEED@"; };
  git = builtins.fetchGit { url = ./repo; };
  note = builtins.toFile "note-@SEED@" "see ${src}";
  mk = attrs: derivation ({ inherit system; builder = "/bin/sh"; } // attrs);
  a = mk { name = "a-@SEED@"; outputs = [ "out" "dev" ]; args = [ "-c" "echo ${src} ${git}" ]; };
  fixed = mk {
    name = "fixed-@SEED@"; args = [ "-c" "echo" ];
    outputHashMode = "flat"; outputHashAlgo = "sha256";
    outputHash = "0000000000000000000000000000000000000000000000000000";
  };
in mk {
  name = "b-@SEED@";
  args = [ "-c" "echo ${a} ${a.dev} ${fixed} ${note} \"q\\x\" > $out" ];
  tricky = "tab\there\nnewline \"quoted\" back\\slash \r return";
}
"""


def instantiate(tmp_path: Path, runner: NixRunner) -> str:
    """The top `.drv` path of a fresh sample (new store paths for every tmp_path)."""
    (tmp_path / "tree" / "sub").mkdir(parents=True)
    (tmp_path / "tree" / "sub" / "file").write_text("a file\n")
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "busybox-ish").write_text(tmp_path.name)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], check=True)
    seed = tmp_path.name.replace("_", "-")[-40:]
    text = EXPR.replace("@SYSTEM@", nix_system()).replace("@SEED@", seed)
    (tmp_path / "default.nix").write_text(text)
    return runner.run("nix-instantiate", str(tmp_path / "default.nix")).text.strip()


def closure(runner: NixRunner, drv: str) -> list[str]:
    return runner.run("nix-store", "--query", "--requisites", drv).text.split()


def references(runner: NixRunner, path: str) -> list[str]:
    return runner.run("nix-store", "--query", "--references", path).text.split()
