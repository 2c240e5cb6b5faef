"""The staging endpoint and the signing step, with real Nix on both sides: a stock
`nix copy --to http://.../staging/<drv>/<token>` uploads a built closure (only what the cache
lacks), the builder verifies it, signs it and pushes it, and a stock nix client substitutes it
with the cluster key. Refused, with a clear reason and nothing signed: a wrong token, a path
that is not an output of the job, a NAR whose bytes were changed after upload, an output that
never arrived."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from niphas_builder.verify import UploadRefused
from niphas_common.nix.errors import CommandError
from niphas_common.nix.runner import NixRunner
from tests.nix_harness import CacheKey

from .conftest import BuildFlake, Staging, build_job

pytestmark = [pytest.mark.nix]


def narinfos(cache_dir: Path) -> set[str]:
    return {p.name for p in cache_dir.glob("*.narinfo")}


async def test_uploaded_closure_is_verified_signed_and_substitutable(
    staging: Staging,
    build_flake: Callable[..., BuildFlake],
    nix_runner: NixRunner,
    cache_key: CacheKey,
    tmp_path: Path,
) -> None:
    flake = build_flake()
    job = build_job(flake, "app")
    [app] = job.outputs.values()
    await staging.area.prepare(job)
    nix_runner.run("nix-store", "--realise", job.drv_path)
    lib = next(str(p) for p in nix_runner.path_info([app], recursive=True) if "-lib-" in str(p))
    known = staging.area.known_outputs(job.drv_hash)
    assert known is not None and app in known and lib in known
    # The .drv and the sources (busybox) are in the cache already: only outputs are uploaded.
    await nix_runner.arun("nix", "copy", "--to", staging.upload_url(job), app)
    staged = narinfos(staging.area.directory(job.drv_hash))
    assert len(staged) == 2 and not (narinfos(staging.cache_dir) & staged)

    published = await staging.area.publish(job)
    assert set(published) == {app, lib}
    info = await staging.cache.client.narinfo(app)  # checks our signature
    assert info is not None and len(info.sigs) == 1
    nix_runner.run(
        "nix", "copy", "--from", f"file://{staging.cache_dir}", "--to", str(tmp_path / "client"),
        app, "--option", "trusted-public-keys", str(cache_key.public),
    )  # fmt: skip
    assert (tmp_path / "client" / app.removeprefix("/") / "bin" / "app").exists()


async def test_wrong_token_is_refused(
    staging: Staging, build_flake: Callable[..., BuildFlake], nix_runner: NixRunner
) -> None:
    job = build_job(build_flake(), "lib")
    await staging.area.prepare(job)
    nix_runner.run("nix-store", "--realise", job.drv_path)
    other = staging.area.token("0" * 32)
    # Nix sees no binary cache there (nix-cache-info is refused too)...
    with pytest.raises(CommandError, match="does not appear to be a binary cache"):
        await nix_runner.arun(
            "nix", "copy", "--to", staging.upload_url(job, other), job.outputs["out"]
        )
    # ...and a direct upload gets the reason.
    narinfo = f"{staging.area.url(job)}/{other}/{job.outputs['out'][11:43]}.narinfo"
    async with aiohttp.ClientSession() as session, session.put(narinfo, data=b"x") as response:
        assert response.status == 403
        assert "no build of this derivation is waiting for this token" in await response.text()
    assert not list(staging.area.directory(job.drv_hash).iterdir())


async def test_path_that_is_not_an_output_of_the_job_is_refused(
    staging: Staging, build_flake: Callable[..., BuildFlake], nix_runner: NixRunner
) -> None:
    job, stranger = build_job(build_flake(), "lib"), build_job(build_flake(), "lib")
    await staging.area.prepare(job)
    nix_runner.run("nix-store", "--realise", stranger.drv_path)
    # Uploading another derivation's output under this job's token: refused at the door...
    with pytest.raises(CommandError, match="not an output of this build"):
        await nix_runner.arun(
            "nix", "copy", "--to", staging.upload_url(job), stranger.outputs["out"]
        )
    # ...and by the signing step, were it put there some other way.
    await nix_runner.arun(
        "nix",
        "copy",
        "--to",
        f"file://{staging.area.directory(job.drv_hash)}?compression=zstd",
        stranger.outputs["out"],
    )
    with pytest.raises(UploadRefused, match="is not an output of this build or its dependencies"):
        await staging.area.publish(job)
    assert await staging.cache.client.narinfo(stranger.outputs["out"]) is None


async def test_tampered_nar_or_missing_output_is_refused_and_nothing_signed(
    staging: Staging, build_flake: Callable[..., BuildFlake], nix_runner: NixRunner
) -> None:
    job = build_job(build_flake(), "app")
    [app] = job.outputs.values()
    await staging.area.prepare(job)
    with pytest.raises(UploadRefused, match=f"output {app} was neither uploaded nor in the cache"):
        await staging.area.publish(job)

    nix_runner.run("nix-store", "--realise", job.drv_path)
    await nix_runner.arun("nix", "copy", "--to", staging.upload_url(job, compression="none"), app)
    directory = staging.area.directory(job.drv_hash)
    [nar] = [p for p in (directory / "nar").iterdir() if b"exec " in p.read_bytes()]
    data = bytearray(nar.read_bytes())
    index = data.index(b"exec ")  # inside app's script: same size, other content
    data[index : index + 4] = b"EXEC"
    nar.write_bytes(bytes(data))
    with pytest.raises(UploadRefused, match="uploaded NAR does not match its narinfo"):
        await staging.area.publish(job)
    assert await staging.cache.client.narinfo(app) is None
    # Only what prepare() pushed is there: the .drv files and the sources.
    outputs = [p for p in _cached_paths(staging) if not p.endswith(".drv")]
    assert all("-lib-" not in p and "-app-" not in p for p in outputs), outputs


def _cached_paths(staging: Staging) -> list[str]:
    return [p.read_text().splitlines()[0] for p in staging.cache_dir.glob("*.narinfo")]
