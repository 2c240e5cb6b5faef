"""Real-Nix fixtures shared by every service's tests (loaded from tests/conftest.py).

- `nix_runner`: a NixRunner for the machine's store (fails, naming the install step, without nix).
- `nix_tools`: a store path holding `bin/busybox`, added once per session with a GC root, so
  offline derivations have a builder (there is no nixpkgs here).
- `make_flake`: writes a tiny offline flake into the test's tmp dir. Its `app` output is a
  script that references the `lib` output and the tools path: a multi-path closure.
- `cache_key`: a fresh Nix-format signing key pair (files on disk for `nix --secret-key`).
- `built_closure`: that flake's `app`, built, with the path info of its closure.
- `make_file_cache`: `nix copy --to file://...` of some paths, signed, with a compression.
"""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from niphas_common.nix.runner import NixRunner, PathInfo
from niphas_common.nix.signing import PublicKey, SecretKey, TrustedKeys
from niphas_common.nix.store_path import StorePath
from niphas_demo.sample import nix_system

__all__ = ["nix_system"]  # re-exported for the test modules that build flakes

BUSYBOX = Path("/bin/busybox")


@dataclass(frozen=True)
class NixTools:
    path: StorePath
    """The store path holding bin/busybox."""

    @property
    def busybox(self) -> str:
        return f"{self.path}/bin/busybox"


@dataclass(frozen=True)
class Flake:
    dir: Path
    name: str

    @property
    def ref(self) -> str:
        return f"path:{self.dir}"

    def installable(self, attr: str = "default") -> str:
        return f"{self.ref}#{attr}"


@dataclass(frozen=True)
class CacheKey:
    secret: SecretKey
    secret_file: Path
    public_file: Path

    @property
    def public(self) -> PublicKey:
        return self.secret.public_key

    @property
    def trusted(self) -> TrustedKeys:
        return TrustedKeys([self.public])


@pytest.fixture(scope="session")
def nix_runner() -> NixRunner:
    if shutil.which("nix") is None or shutil.which("nix-store") is None:
        pytest.fail("nix is not installed: `make nix` (scripts/setup-nix.sh) installs it")
    return NixRunner()


@pytest.fixture(scope="session")
def nix_tools(nix_runner: NixRunner, tmp_path_factory: pytest.TempPathFactory) -> NixTools:
    if not BUSYBOX.exists():
        pytest.fail(f"{BUSYBOX} is missing: `make nix` installs busybox-static")
    base = tmp_path_factory.mktemp("nix-tools")
    src = base / "niphas-test-tools"
    (src / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, src / "bin" / "busybox")
    path = nix_runner.add_to_store(src)
    # An indirect root: alive while the session's tmp dir exists, collectable afterwards.
    nix_runner.add_root(path, base / "gcroot")
    return NixTools(path)


_FLAKE = """\
{
  inputs.tools = { url = "path:@TOOLS@"; flake = false; };
  outputs = { self, tools }:
    let
      system = "@SYSTEM@";
      bb = "${tools}/bin/busybox";
      lib = derivation {
        inherit system;
        name = "@NAME@-lib";
        builder = bb;
        args = [ "sh" "-c" "${bb} mkdir -p $out/share && echo '@GREETING@' > $out/share/greeting" ];
      };
      app = derivation {
        inherit system;
        name = "@NAME@";
        builder = bb;
        args = [ "sh" "-c" ''
          ${bb} mkdir -p $out/bin
          printf '#!${bb} sh\\nexec ${bb} cat ${lib}/share/greeting\\n' > $out/bin/@NAME@
          ${bb} chmod +x $out/bin/@NAME@
        '' ];
      } // { meta.mainProgram = "@NAME@"; };
    in {
      packages.${system} = { default = app; inherit app lib; };
    };
}
"""


@pytest.fixture
def make_flake(tmp_path: Path, nix_tools: NixTools) -> Callable[..., Flake]:
    """Factory: `make_flake(name="demo", greeting="hello")` -> Flake in a fresh directory.
    Different greetings give different store paths (tests that delete paths want that)."""
    count = 0

    def make(name: str = "demo", greeting: str = "hello from niphas") -> Flake:
        nonlocal count
        count += 1
        directory = tmp_path / f"flake-{count}"
        directory.mkdir()
        text = (
            _FLAKE.replace("@TOOLS@", str(nix_tools.path))
            .replace("@SYSTEM@", nix_system())
            .replace("@NAME@", name)
            .replace("@GREETING@", greeting)
        )
        (directory / "flake.nix").write_text(textwrap.dedent(text))
        return Flake(directory, name)

    return make


@pytest.fixture
def cache_key(tmp_path: Path) -> CacheKey:
    key = SecretKey.generate("niphas-test-1")
    secret_file = tmp_path / "cache.sk"
    public_file = tmp_path / "cache.pk"
    secret_file.write_text(str(key))
    public_file.write_text(str(key.public_key))
    return CacheKey(key, secret_file, public_file)


@dataclass(frozen=True)
class BuiltClosure:
    """The `app` output of a `make_flake` flake, built, and its whole closure's path info."""

    app: StorePath
    infos: dict[str, PathInfo]

    @property
    def paths(self) -> list[StorePath]:
        return [info.path for info in self.infos.values()]


@pytest.fixture
def built_closure(make_flake: Callable[..., Flake], nix_runner: NixRunner) -> BuiltClosure:
    """A freshly built multi-path closure: app -> lib, app -> tools (busybox)."""
    flake = make_flake()
    out = nix_runner.build([flake.installable("app")])
    app = StorePath.parse(out[0]["outputs"]["out"])
    return BuiltClosure(app, nix_runner.path_info([app], recursive=True))


@dataclass(frozen=True)
class FileCache:
    dir: Path
    compression: str

    @property
    def url(self) -> str:
        return f"file://{self.dir}"


@pytest.fixture
def make_file_cache(
    tmp_path: Path, nix_runner: NixRunner, cache_key: CacheKey
) -> Callable[..., FileCache]:
    """Factory: `make_file_cache(paths, compression="zstd")` runs the real `nix copy --to
    file://...` signed with `cache_key` and returns the cache directory."""

    def make(paths: list[StorePath], compression: str = "zstd") -> FileCache:
        directory = tmp_path / f"cache-{compression}"
        url = f"file://{directory}?compression={compression}&secret-key={cache_key.secret_file}"
        nix_runner.copy(paths, to=url)
        return FileCache(directory, compression)

    return make


@pytest.fixture
def signed_cache(
    built_closure: BuiltClosure, make_file_cache: Callable[..., FileCache]
) -> FileCache:
    """The built closure in a signed, uncompressed file cache (the builder's cache)."""
    return make_file_cache(built_closure.paths, "none")
