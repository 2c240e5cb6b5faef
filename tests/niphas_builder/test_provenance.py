"""Uploads vouched for by content, with a builder whose store lacks every `.drv`: real Nix
uploads a job's derivation closure and outputs (built on the host) to the staging endpoint.
Refused, naming the path, with nothing signed: a `.drv` rewritten to claim another output,
a source whose content is not its path's, an output of a derivation outside the job's
closure, and a derivation closure whose top is not the job's `drv_path`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from niphas_builder.executor import BuildJob
from niphas_builder.verify import UploadRefused, door_problem
from niphas_common.nix import nix32
from niphas_common.nix.hashes import Hash
from niphas_common.nix.nar import nar_bytes
from niphas_common.nix.narinfo import NarInfo
from niphas_common.nix.runner import NixRunner
from niphas_common.nix.store_path import StorePath

from .conftest import BuildFlake, Staging, build_job

pytestmark = [pytest.mark.nix]


async def upload(staging: Staging, job: BuildJob, runner: NixRunner, of: BuildJob) -> None:
    """Build `of` on the host and upload its derivation closure and outputs under `job`."""
    runner.run("nix-store", "--realise", of.drv_path)
    url = staging.upload_url(job)
    await runner.arun("nix", "copy", "--derivation", "--to", url, of.drv_path)
    await runner.arun("nix", "copy", "--to", url, *of.outputs.values())


def restage(staging: Staging, job: BuildJob, path: str, content: Path) -> None:
    """Replace the upload of `path` by the NAR of `content`, its narinfo made consistent (so
    only what the bytes are, not how they were sent, can give it away)."""
    directory = staging.area.directory(job.drv_hash)
    file = directory / f"{path.removeprefix('/nix/store/')[:32]}.narinfo"
    info = NarInfo.parse(file.read_text())
    data = nar_bytes(content)
    nar_hash = Hash.of(data)
    url = f"nar/{nix32.encode(nar_hash.digest)}.nar"
    (directory / url).write_bytes(data)
    info = replace(
        info, url=url, compression="none", nar_hash=nar_hash, nar_size=len(data),
        file_hash=None, file_size=None,
    )  # fmt: skip
    file.write_text(info.render())


def signed_nothing(staging: Staging) -> bool:
    return not list(staging.cache_dir.glob("*.narinfo"))


@pytest.fixture
async def job(blind_staging: Staging, build_flake: Callable[..., BuildFlake]) -> BuildJob:
    job = build_job(build_flake(), "app")
    await blind_staging.area.prepare(job)
    assert blind_staging.area.known_outputs(job.drv_hash) is None
    return job


async def test_derivation_closure_and_outputs_are_vouched_for_by_content(
    blind_staging: Staging, job: BuildJob, nix_runner: NixRunner
) -> None:
    await upload(blind_staging, job, nix_runner, job)
    published = await blind_staging.area.publish(job)
    assert job.drv_path in published and job.outputs["out"] in published
    assert {p.rsplit("-", 1)[-1] for p in published} >= {"source", "0.drv", "0"}
    assert len(published) == 5  # app, lib, their .drv files, the busybox source


async def test_drv_rewritten_to_claim_another_output_is_refused(
    blind_staging: Staging, job: BuildJob, nix_runner: NixRunner, tmp_path: Path
) -> None:
    await upload(blind_staging, job, nix_runner, job)
    app = job.outputs["out"]
    forged = tmp_path / "forged.drv"
    forged.write_text(Path(job.drv_path).read_text().replace(app, app[:-1] + "X"))
    restage(blind_staging, job, job.drv_path, forged)
    with pytest.raises(UploadRefused, match=f"{job.drv_path}: a .drv whose contents"):
        await blind_staging.area.publish(job)
    assert signed_nothing(blind_staging)


async def test_source_whose_content_is_not_its_path_is_refused(
    blind_staging: Staging, job: BuildJob, nix_runner: NixRunner, tmp_path: Path
) -> None:
    await upload(blind_staging, job, nix_runner, job)
    directory = blind_staging.area.directory(job.drv_hash)
    [source] = [
        str(i.store_path)
        for f in directory.glob("*.narinfo")
        if (i := NarInfo.parse(f.read_text())).store_path.name == "source"
    ]
    (tmp_path / "evil" / "bin").mkdir(parents=True)
    (tmp_path / "evil" / "bin" / "busybox").write_text("#!/bin/sh\necho pwned\n")
    restage(blind_staging, job, source, tmp_path / "evil")
    with pytest.raises(UploadRefused, match=f"{source} is not an output of this build"):
        await blind_staging.area.publish(job)
    assert signed_nothing(blind_staging)


async def test_output_of_a_derivation_outside_the_closure_is_refused(
    blind_staging: Staging,
    job: BuildJob,
    build_flake: Callable[..., BuildFlake],
    nix_runner: NixRunner,
) -> None:
    stranger = build_job(build_flake(), "lib")
    await upload(blind_staging, job, nix_runner, job)
    nix_runner.run("nix-store", "--realise", stranger.drv_path)
    out = stranger.outputs["out"]
    await nix_runner.arun("nix", "copy", "--to", blind_staging.upload_url(job), out)
    with pytest.raises(UploadRefused, match=f"{out} is not an output of this build or its dep"):
        await blind_staging.area.publish(job)
    assert signed_nothing(blind_staging)


async def test_derivation_closure_of_another_top_is_refused(
    blind_staging: Staging,
    job: BuildJob,
    build_flake: Callable[..., BuildFlake],
    nix_runner: NixRunner,
) -> None:
    stranger = build_job(build_flake(), "app")
    await upload(blind_staging, job, nix_runner, stranger)  # its own closure, whole and true
    with pytest.raises(UploadRefused, match=f"{job.drv_path}, this job's derivation, was nei"):
        await blind_staging.area.publish(job)
    assert signed_nothing(blind_staging)


async def test_derivations_already_in_the_cache_vouch_for_fresh_outputs(
    staging: Staging, blind_staging: Staging, job: BuildJob, nix_runner: NixRunner
) -> None:
    """Another builder (one with the `.drv`) pushed the derivation closure to the cache: the
    pod uploads only outputs, and the walk reads the `.drv` files from the cache."""
    await staging.area.prepare(job)  # same cache directory: the .drv files are signed there
    await upload(blind_staging, job, nix_runner, job)
    published = await blind_staging.area.publish(job)
    assert job.outputs["out"] in published and len(published) == 2  # app and lib
    assert not any(p.endswith((".drv", "-source")) for p in published)


def test_door_lets_in_known_outputs_drvs_and_claimed_sources_only() -> None:
    base = "/nix/store/" + "a" * 32
    info = NarInfo.parse(
        f"StorePath: {base}-x\nURL: nar/x\nNarHash: sha256:{'0' * 52}\nNarSize: 1\n"
    )
    assert door_problem(info, None) is None  # outputs unknown: publish decides
    assert door_problem(info, frozenset({f"{base}-x"})) is None
    assert door_problem(info, frozenset()) == f"{base}-x is not an output of this build"
    assert door_problem(replace(info, ca=f"fixed:r:sha256:{'0' * 52}"), frozenset()) is None
    drv = replace(info, store_path=StorePath.parse(f"{base}-x.drv"))
    assert door_problem(drv, frozenset()) is None
