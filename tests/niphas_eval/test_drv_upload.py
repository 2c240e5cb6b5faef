"""Evaluated derivations reach the cluster cache, so a build needs neither the forge nor its
credentials. A real worker evaluates a private flake (and its private git input) from a local
forge that requires a token per repository, then uploads the derivation closure to a real
cache (the mesh in role cache, with its upload token) before publishing eval.done. With the
forge stopped, a fresh empty store that requires signatures, trusts no key and has only that
cache as substituter realises the .drv: content-addressed paths need no signature. A second
upload of the same derivations writes nothing. No token (git or cache) reaches an event, a log
line or a file left behind. An upload that fails (cache down, a wrong token) costs one log
line and eval.done is published all the same."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import yaml

from niphas_common.bus.bus import Bus
from niphas_common.nix.runner import NixRunner
from niphas_common.nix.signing import SecretKey
from niphas_eval.app import build_worker, drv_upload
from niphas_eval.settings import EvalSettings
from niphas_mesh.cache_role import start_cache
from niphas_mesh.settings import MeshSettings
from tests.helpers import serving
from tests.niphas_eval.conftest import GitRepo, push_for
from tests.niphas_eval.git_server import git_forge
from tests.niphas_eval.test_private import (
    APP_TOKEN,
    LIB_TOKEN,
    TOKENS,
    commit_private_flake,
    private_repos,
    push_for_url,
    wait_for,
)
from tests.nix_harness import NixTools

pytestmark = pytest.mark.nix

CACHE_TOKEN = "cache-upl0ad-t0ken"


@pytest.fixture
async def cache(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """The cluster cache on a loopback port: (its URL, the file holding its upload token).
    It trusts a key, as deployed: unsigned narinfos get in only when their bytes prove them."""
    token_file = tmp_path / "cache-upload" / "token"
    token_file.parent.mkdir()
    token_file.write_text(CACHE_TOKEN + "\n")
    server = await start_cache(
        MeshSettings(
            role="cache",
            listen="127.0.0.1:0",
            cache_dir=tmp_path / "cluster-cache",
            state_dir=tmp_path / "cache-state",
            upload_token_file=token_file,
            trusted_public_keys=str(SecretKey.generate("niphas-cluster-1").public_key),
        )
    )
    try:
        yield server.url, token_file
    finally:
        await server.close()


def realise_from(cache_url: str, store: Path, drv: str) -> list[str]:
    """`nix-store --realise` of `drv` in the empty chroot store `store`, substituting only
    from `cache_url`, requiring signatures and trusting no key."""
    runner = NixRunner(
        store=str(store),
        options={
            "substituters": cache_url,
            "require-sigs": "true",
            "trusted-public-keys": "",
            "narinfo-cache-positive-ttl": "0",
            "narinfo-cache-negative-ttl": "0",
        },
    )
    return runner.run("nix-store", "--realise", drv, timeout=120).text.split()


def cache_files(directory: Path) -> dict[str, int]:
    """Every file of the cache directory and its inode (a rewrite makes a new one)."""
    return {str(p.relative_to(directory)): p.stat().st_ino for p in directory.rglob("*.*")}


async def test_a_private_flake_builds_from_the_cache_without_the_forge(
    bus: Bus,
    tmp_path: Path,
    nix_tools: NixTools,
    make_repo: Callable[..., GitRepo],
    eval_settings: EvalSettings,
    cache: tuple[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    cache_url, cache_token_file = cache
    lib, app = private_repos(make_repo)
    async with git_forge(tmp_path / "forge", TOKENS) as forge:
        commit = await commit_private_flake(app, lib, forge, nix_tools)
        credentials = tmp_path / "secrets" / "git-credentials.yaml"
        credentials.parent.mkdir()
        credentials.write_text(yaml.safe_dump({
            forge.repo_url("app"): {"username": "niphas", "token": APP_TOKEN},
            forge.repo_url("lib"): {"username": "niphas", "token": LIB_TOKEN},
        }))  # fmt: skip
        settings = eval_settings.model_copy(
            update={
                "allowed_refs": [f"{forge.url}/*", f"path:{nix_tools.path}"],
                "git_credentials_file": credentials,
                "drv_upload_url": cache_url,
                "drv_upload_token_file": cache_token_file,
            }
        )
        worker = await build_worker(bus, settings)
        async with serving(bus, [worker.subscription()]):
            await bus.publish(push_for_url(app, forge.repo_url("app"), commit))
            [done] = await wait_for(bus, 1)
    assert done.status == "succeeded", done.error
    [attr] = done.attributes
    assert attr.drv_path is not None and "out" in attr.outputs

    # The forge is gone: the build gets everything from the cache, without any signature.
    realised = await asyncio.to_thread(realise_from, cache_url, tmp_path / "fresh", attr.drv_path)
    assert realised == [attr.outputs["out"]]
    greeting = tmp_path / "fresh" / attr.outputs["out"].lstrip("/") / "bin" / "greeting"
    assert greeting.read_text().strip() == "hello from a private input"

    # Only what the cache lacks travels: uploading the same derivations writes nothing.
    cache_dir = tmp_path / "cluster-cache"
    before = cache_files(cache_dir)
    assert f"{Path(attr.drv_path).name[:32]}.narinfo" in before
    upload = drv_upload(settings, NixRunner())
    assert upload is not None
    await upload.upload([attr.drv_path])
    assert cache_files(cache_dir) == before

    events = json.dumps(done.model_dump(mode="json"))
    for secret in (APP_TOKEN, LIB_TOKEN, CACHE_TOKEN):
        assert secret not in events
        assert secret not in caplog.text
        for path in settings.state_dir.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert secret.encode() not in path.read_bytes(), path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("failure", ["cache-down", "wrong-token"])
async def test_a_failed_upload_still_publishes_eval_done(
    failure: str,
    bus: Bus,
    tmp_path: Path,
    make_repo: Callable[..., GitRepo],
    eval_settings: EvalSettings,
    cache: tuple[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    cache_url, _ = cache
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-cache-t0ken\n")
    url = f"http://127.0.0.1:{free_port()}" if failure == "cache-down" else cache_url
    settings = eval_settings.model_copy(
        update={"drv_upload_url": url, "drv_upload_token_file": wrong}
    )
    app = make_repo("app")
    commit = await asyncio.to_thread(app.commit, greeting="built by the pod itself")
    worker = await build_worker(bus, settings)
    async with serving(bus, [worker.subscription()]):
        await bus.publish(push_for(app, commit))
        [done] = await wait_for(bus, 1)
    assert done.status == "succeeded", done.error
    assert done.attributes[0].drv_path is not None
    [line] = [r for r in caplog.records if "derivations not uploaded" in r.getMessage()]
    assert line.levelname == "WARNING" and url in line.getMessage()
    assert "not-the-cache-t0ken" not in caplog.text
    assert not list((tmp_path / "cluster-cache").glob("*.narinfo"))
