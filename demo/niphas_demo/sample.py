"""The sample repository: a git repository holding a flake that builds an HTTP server app with
the busybox builder (there is no nixpkgs offline), standing in for one hosted on a forge.

The closure has three paths: the app (a script running `busybox httpd`), the page it serves
(`www`, whose text carries the version) and the tools path holding the static busybox. Changing
the version changes `www` and so the app: a new closure per version.
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
  inputs.tools = { url = "path:@TOOLS@"; flake = false; };
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
          printf 'exec ${bb} httpd -f -p "0.0.0.0:''${PORT:-8080}" -h ${www}\\n' >> $out/bin/@APP@
          ${bb} chmod +x $out/bin/@APP@
        '' ];
      } // { meta.mainProgram = "@APP@"; };
    in {
      packages.${system}.default = app;
    };
}
"""

_GIT_ENV = {
    "GIT_AUTHOR_NAME": "Niphas Demo",
    "GIT_AUTHOR_EMAIL": "demo@niphas.invalid",
    "GIT_COMMITTER_NAME": "Niphas Demo",
    "GIT_COMMITTER_EMAIL": "demo@niphas.invalid",
    "GIT_CONFIG_NOSYSTEM": "1",
    "HOME": "/nonexistent",
    "PATH": "/usr/bin:/bin",
}


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
class SampleRepo:
    """The repository a forge would host; `url` is what the webhook names as clone_url."""

    dir: Path
    tools: str

    @property
    def url(self) -> str:
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
            env={**_GIT_ENV, "PATH": os.environ.get("PATH", _GIT_ENV["PATH"])},
        )
        return out.stdout.strip()

    def ensure(self) -> None:
        if not (self.dir / ".git").exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            self.git("init", "-q", "-b", "main")

    def head(self) -> str:
        return self.git("rev-parse", "HEAD")

    def commit_version(self, version: str) -> tuple[str, str]:
        """Commit the flake serving `version`; returns (before, after) commit ids."""
        before = self.git("rev-parse", "--verify", "-q", "HEAD") if self._has_head() else "0" * 40
        text = (
            _FLAKE.replace("@TOOLS@", self.tools)
            .replace("@SYSTEM@", nix_system())
            .replace("@APP@", APP_NAME)
            .replace("@VERSION@", version)
        )
        (self.dir / "flake.nix").write_text(text)
        self.git("add", "flake.nix")
        # Evaluation takes inputs only from the committed lock, as a careful forge user would
        # commit it.
        NixRunner().run("nix", "flake", "lock", f"git+file://{self.dir}")
        self.git("add", "flake.lock")
        # --allow-empty: a second demo run commits the same tree again, as a new push.
        self.git("commit", "-q", "--allow-empty", "-m", f"serve {version}")
        return before, self.head()

    def _has_head(self) -> bool:
        return (
            subprocess.run(
                ["git", "-C", str(self.dir), "rev-parse", "--verify", "-q", "HEAD"],
                capture_output=True,
                env=_GIT_ENV,
            ).returncode
            == 0
        )
