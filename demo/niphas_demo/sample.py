"""The sample repository: a git repository holding a flake that builds an HTTP server app with
the busybox builder (there is no nixpkgs offline), standing in for one hosted on a forge.

The closure has three paths: the app (a script running `busybox httpd`), the page it serves
(`www`, whose text carries the version) and the tools path holding the static busybox. Changing
the version changes `www` and so the app: a new closure per version.

`FlakeRepo` is the one helper that keeps a flake in a local git repository and commits it with
its `flake.lock` (evaluation takes inputs only from the committed lock), as a forge user would
push it; the demo, the tests' forge repositories and the benchmarks all use it, with
`nix_system` and `add_tools` (a `path:/nix/store/...-tools` input the eval allowlist names).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from niphas_common.nix.runner import NixRunner

BUSYBOX = Path("/bin/busybox")
APP_NAME = "niphas-demo-web"

_FLAKE = """\
{
  description = "Niphas demo: a web page served by busybox httpd";
  inputs.tools = { url = "@TOOLS@"; flake = false; };
  outputs = { self, tools }:
    let
      system = "@SYSTEM@";
      bb = "${tools}/bin/busybox";
      www = derivation {
        inherit system;
        name = "niphas-demo-www";
        builder = bb;
        args = [ "sh" "-c" ''
          ${bb} mkdir -p $out
          echo '<h1>Niphas demo @VERSION@</h1><p>served from a Nix closure</p>' > $out/index.html
        '' ];
      };
      app = derivation {
        inherit system;
        name = "@APP@";
        builder = bb;
        args = [ "sh" "-c" ''
          ${bb} mkdir -p $out/bin
          printf '#!${bb} sh\\n' > $out/bin/@APP@
          printf 'exec ${bb} httpd -f -h ${www}' >> $out/bin/@APP@
          printf ' -p "''${HOST:-0.0.0.0}:''${PORT:-8080}"\\n' >> $out/bin/@APP@
          ${bb} chmod +x $out/bin/@APP@
        '' ];
      } // { meta.mainProgram = "@APP@"; };
    in {
      packages.${system}.default = app;
    };
}
"""

GIT_ENV = {
    "GIT_AUTHOR_NAME": "Niphas",
    "GIT_AUTHOR_EMAIL": "niphas@niphas.invalid",
    "GIT_COMMITTER_NAME": "Niphas",
    "GIT_COMMITTER_EMAIL": "niphas@niphas.invalid",
    "GIT_CONFIG_NOSYSTEM": "1",
    "HOME": "/nonexistent",
    "PATH": "/usr/bin:/bin",
}
"""git runs with a fixed identity and no user or system configuration."""


def nix_system() -> str:
    """The Nix system double of this machine (a flake cannot read builtins.currentSystem)."""
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower())
    return f"{machine or platform.machine().lower()}-linux"


def add_tools(nix: NixRunner, directory: Path) -> str:
    """Add a directory holding bin/busybox to the store, rooted under `directory` (so a GC
    keeps it while the demo's state exists); returns its store path."""
    if not BUSYBOX.exists():
        raise RuntimeError(f"{BUSYBOX} is missing: apt-get install busybox-static")
    src = directory / "niphas-demo-tools"
    (src / "bin").mkdir(parents=True, exist_ok=True)
    if not (src / "bin" / "busybox").exists():
        shutil.copy2(BUSYBOX, src / "bin" / "busybox")
    path = str(nix.add_to_store(src))
    nix.add_root(path, directory / "tools.gcroot")
    return path


@dataclass
class FlakeRepo:
    """A local git repository holding a flake, standing in for one hosted on a forge."""

    dir: Path

    @property
    def url(self) -> str:
        """What a webhook names as clone_url."""
        return f"file://{self.dir}"

    @property
    def flake_ref(self) -> str:
        return f"git+{self.url}"

    def git(self, *args: str) -> str:
        out = subprocess.run(
            ["git", "-C", str(self.dir), *args],
            check=True,
            capture_output=True,
            text=True,
            env={**GIT_ENV, "PATH": os.environ.get("PATH", GIT_ENV["PATH"])},
        )
        return out.stdout.strip()

    def ensure(self) -> None:
        """Create the directory and an empty repository on `main` unless one is there."""
        if not (self.dir / ".git").exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            self.git("init", "-q", "-b", "main")

    def head(self) -> str:
        return self.git("rev-parse", "HEAD")

    def has_head(self) -> bool:
        return (
            subprocess.run(
                ["git", "-C", str(self.dir), "rev-parse", "--verify", "-q", "HEAD"],
                capture_output=True,
                env=GIT_ENV,
            ).returncode
            == 0
        )

    def commit_flake(
        self,
        text: str,
        message: str,
        *,
        lock: bool = True,
        must_lock: bool = False,
        allow_empty: bool = False,
    ) -> str:
        """Write and commit flake.nix with (when `lock`) its flake.lock, as an author runs
        `nix flake lock`; returns the new commit id. A flake nix cannot lock (a syntax error)
        is committed without a lock, unless `must_lock` (then `CommandError`)."""
        (self.dir / "flake.nix").write_text(text)
        self.git("add", "flake.nix")
        if lock:
            nix = NixRunner(timeout=120.0)
            nix.run("nix", "flake", "lock", f"git+file://{self.dir}", check=must_lock)
            if (self.dir / "flake.lock").exists():
                self.git("add", "flake.lock")
        self.git("commit", "-q", *(["--allow-empty"] if allow_empty else []), "-m", message)
        return self.head()


@dataclass
class SampleRepo(FlakeRepo):
    """The demo's repository: the web app flake, one commit per version. `tools` is the flake
    input holding bin/busybox (`path:/nix/store/...-tools` on one machine, a git URL the
    forge serves on a cluster); `clone_url` is where the forge serves this repository."""

    tools: str
    clone_url: str | None = None

    @property
    def url(self) -> str:
        return self.clone_url or f"file://{self.dir}"

    def commit_version(self, version: str) -> tuple[str, str]:
        """Commit the flake serving `version`; returns (before, after) commit ids."""
        before = self.head() if self.has_head() else "0" * 40
        text = (
            _FLAKE.replace("@TOOLS@", self.tools)
            .replace("@SYSTEM@", nix_system())
            .replace("@APP@", APP_NAME)
            .replace("@VERSION@", version)
        )
        # --allow-empty: a second demo run commits the same tree again, as a new push.
        return before, self.commit_flake(text, f"serve {version}", must_lock=True, allow_empty=True)
