"""Builder fixtures: flakes whose derivations succeed, fail or take a while, evaluated into
real `.drv` files, and BuilderSettings pointing at a per-test file:// cache."""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from niphas_builder.cache import BuildCache
from niphas_builder.executor import BuildJob
from niphas_builder.settings import BuilderSettings
from niphas_builder.staging import StagingArea
from niphas_builder.staging_server import build_app
from niphas_common.nix.runner import NixRunner
from niphas_schemas import EvalDone, EvaluatedAttribute
from tests.nix_harness import CacheKey, NixTools, nix_system

COMMIT = "a" * 40
REPO = "https://forge.example/org/app.git"

# `app` -> `lib` -> tools: a multi-path closure. `fail` prints numbered lines then exits 1;
# `slow` sleeps @SLEEP@ s first. @SEED@ makes every flake's paths new to the store.
_FLAKE = """\
{
  inputs.tools = { url = "path:@TOOLS@"; flake = false; };
  outputs = { self, tools }:
    let
      system = "@SYSTEM@";
      bb = "${tools}/bin/busybox";
      mk = name: script:
        derivation { inherit system name; builder = bb; args = [ "sh" "-c" script ]; };
      lib = mk "lib-@SEED@" "${bb} mkdir -p $out/share && echo '@SEED@' > $out/share/greeting";
      app = mk "app-@SEED@" ''
        ${bb} mkdir -p $out/bin
        printf '#!${bb} sh\\nexec ${bb} cat ${lib}/share/greeting\\n' > $out/bin/app
        ${bb} chmod +x $out/bin/app
      '';
      fail = mk "fail-@SEED@" ''
        for i in $(${bb} seq 1 100); do echo "log line $i"; done
        echo "boom: the build broke" >&2
        exit 1
      '';
      slow = mk "slow-@SEED@" ''
        echo "sleeping"; ${bb} sleep @SLEEP@
        ${bb} mkdir -p $out && echo ${lib} > $out/lib-path
      '';
    in { packages.${system} = { inherit app lib fail slow; }; };
}
"""


@dataclass
class BuildFlake:
    dir: Path
    seed: str
    runner: NixRunner
    evaluated: dict[str, EvaluatedAttribute] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"path:{self.dir}"

    def attribute(self, attr: str) -> EvaluatedAttribute:
        """Evaluate `attr` as the eval service would (instantiating its .drv)."""
        if attr not in self.evaluated:
            system = nix_system()
            apply = (
                "d: { drvPath = d.drvPath; outputs = builtins.listToAttrs (map (o: "
                '{ name = o; value = d.${o}.outPath; }) (d.outputs or [ "out" ])); }'
            )
            out = self.runner.run(
                "nix", "eval", "--json", f"{self.ref}#packages.{system}.{attr}", "--apply", apply
            ).json()
            self.evaluated[attr] = EvaluatedAttribute(
                attribute=attr,
                attr_path=f"packages.{system}.{attr}",
                system=system,
                drv_path=out["drvPath"],
                outputs=out["outputs"],
            )
        return self.evaluated[attr]

    def eval_done(
        self,
        *attrs: str,
        commit: str = COMMIT,
        ref: str | None = "refs/heads/main",
        push_event_id: str = "push-1",
        **kw: object,
    ) -> EvalDone:
        return EvalDone(
            push_event_id=push_event_id,
            repository=REPO,
            ref=ref,
            commit=commit,
            locked_flake_ref=self.ref,
            status="succeeded",
            attributes=tuple(self.attribute(a) for a in attrs),
            **kw,
        )

    def output_paths(self) -> list[str]:
        return [p for a in self.evaluated.values() for p in a.outputs.values()]


@pytest.fixture
def build_flake(
    tmp_path: Path, nix_tools: NixTools, nix_runner: NixRunner
) -> Iterator[Callable[..., BuildFlake]]:
    """Factory: `build_flake(sleep=3)` -> a flake with fresh store paths. The outputs built
    from it are deleted from the store afterwards."""
    made: list[BuildFlake] = []

    def make(sleep: int = 3) -> BuildFlake:
        seed = f"{tmp_path.name}-{len(made)}".replace("_", "-")
        directory = tmp_path / f"build-flake-{len(made)}"
        directory.mkdir()
        text = (
            _FLAKE.replace("@TOOLS@", str(nix_tools.path))
            .replace("@SYSTEM@", nix_system())
            .replace("@SEED@", seed)
            .replace("@SLEEP@", str(sleep))
        )
        (directory / "flake.nix").write_text(textwrap.dedent(text))
        flake = BuildFlake(directory, seed, nix_runner)
        made.append(flake)
        return flake

    yield make
    for flake in made:
        paths = [*flake.output_paths(), *(a.drv_path or "" for a in flake.evaluated.values())]
        # Referrers first; paths still alive (or never built) are left to the GC.
        for path in sorted(paths, key=lambda p: ("lib-" in p, p)):
            nix_runner.delete([path], check=False)


@pytest.fixture
def builder_settings(tmp_path: Path, cache_key: CacheKey) -> BuilderSettings:
    return BuilderSettings(
        state_dir=tmp_path / "state",
        name="builder-test",
        cache_url=f"file://{tmp_path / 'cache'}",
        secret_key_file=cache_key.secret_file,
        lease_ttl_s=3.0,
        ack_wait_s=3.0,
        max_parallel_builds=2,
    )


@dataclass
class Staging:
    """A StagingArea serving on a loopback port, in front of a file:// cache."""

    area: StagingArea
    cache: BuildCache
    cache_dir: Path

    def upload_url(self, job: BuildJob, token: str | None = None, compression: str = "zstd") -> str:
        token = self.area.token(job.drv_hash) if token is None else token
        return f"{self.area.url(job)}/{token}?compression={compression}"


async def _serve(tmp_path: Path, cache_key: CacheKey, runner: NixRunner) -> AsyncIterator[Staging]:
    cache_dir = tmp_path / "cache"
    cache = BuildCache(
        runner,
        push_url=f"file://{cache_dir}",
        read_url=f"file://{cache_dir}",
        key_file=cache_key.secret_file,
        trusted=cache_key.trusted,
    )
    area = StagingArea(
        tmp_path / "staging",
        cache_key.secret,
        runner,
        cache,
        base_url="http://unset",
        compression="zstd",
        key_file=cache_key.secret_file,
    )
    server = web.AppRunner(build_app(area, 1 << 30), access_log=None)
    await server.setup()
    site = web.TCPSite(server, "127.0.0.1", 0)
    await site.start()
    port = server.addresses[0][1]
    area.base_url = f"http://127.0.0.1:{port}"
    try:
        yield Staging(area, cache, cache_dir)
    finally:
        await server.cleanup()
        await cache.close()


@pytest.fixture
async def staging(
    tmp_path: Path, cache_key: CacheKey, nix_runner: NixRunner
) -> AsyncIterator[Staging]:
    """A builder on the host's store, which holds the `.drv` files the tests evaluate."""
    async for served in _serve(tmp_path, cache_key, nix_runner):
        yield served


@pytest.fixture
async def blind_staging(tmp_path: Path, cache_key: CacheKey) -> AsyncIterator[Staging]:
    """A builder whose store (an empty chroot store of its own) lacks every `.drv`, as in a
    cluster where the eval worker instantiated them in another pod."""
    runner = NixRunner(store=str(tmp_path / "builder-store"))
    async for served in _serve(tmp_path, cache_key, runner):
        yield served


def build_job(flake: BuildFlake, attr: str) -> BuildJob:
    evaluated = flake.attribute(attr)
    assert evaluated.drv_path is not None
    return BuildJob(
        drv_path=evaluated.drv_path,
        outputs=dict(evaluated.outputs),
        attribute=attr,
        repository=REPO,
        commit=COMMIT,
        locked_flake_ref=flake.ref,
        attr_path=evaluated.attr_path,
    )
