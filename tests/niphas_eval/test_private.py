"""Private repositories: a flake and its git input on a local forge that requires a token per
repository (`git http-backend` behind basic auth on loopback), and a flake behind `sshd` on
loopback that takes one deploy key, evaluated by a real worker with the real nix over a real
nats-server. Without credentials the push fails naming the refusal (and is not kept as the
commit's result); with the credentials file each repository is fetched with its own token
(a token is never sent to another repository) or the key, and no secret reaches an event, a
log line or a file left behind."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from niphas_common.bus.bus import Bus
from niphas_common.nix.content_address import source_path
from niphas_common.nix.hashes import Hash
from niphas_common.nix.runner import NixRunner
from niphas_eval.app import build_worker
from niphas_eval.credentials import GitCredentials
from niphas_eval.settings import EvalSettings
from niphas_schemas import EvalDone, PushReceived
from tests.helpers import serving
from tests.niphas_eval.conftest import GitRepo, eval_dones, flake_nix, push_for
from tests.niphas_eval.git_server import GitForge, basic, git_forge, ssh_forge
from tests.nix_harness import NixTools

pytestmark = pytest.mark.nix

APP_TOKEN = "app-t0ken-5ecret"
LIB_TOKEN = "lib-t0ken-5ecret"


def private_flake(tools: NixTools, lib_url: str) -> str:
    """The test flake whose package's greeting is read from the git input `lib`."""
    inputs = f'inputs.lib = {{ url = "git+{lib_url}"; flake = false; }};'
    text = flake_nix(tools, "@LIB@")
    text = text.replace("outputs = { self, tools }:", "outputs = { self, tools, lib }:")
    text = text.replace("@LIB@", '${builtins.readFile "${lib}/greeting.txt"}')
    return text.replace("{\n  inputs.tools", "{\n  " + inputs + "\n  inputs.tools", 1)


def commit_locked_to(repo: GitRepo, flake: str, local: str, served: str) -> str:
    """Commit `flake` locked against the input at `local` (a file URL), then name it by the
    URL the forge serves it at, as a lock made against the forge would."""
    repo.commit_flake(flake.replace(f"git+{served}", f"git+{local}"), "lock", lock=True,
                      must_lock=True)  # fmt: skip
    lock = (repo.dir / "flake.lock").read_text().replace(local, served)
    (repo.dir / "flake.lock").write_text(lock)
    # Locking put the input in the store; the worker must fetch it from the forge.
    nar_hash = Hash.parse(json.loads(lock)["nodes"]["lib"]["locked"]["narHash"])
    NixRunner().run("nix", "store", "delete", str(source_path("source", nar_hash)))
    (repo.dir / "flake.nix").write_text(flake)
    repo.git("add", "flake.nix", "flake.lock")
    repo.git("commit", "-q", "-m", "served by the forge")
    return repo.head()


TOKENS = {"app": ("niphas", APP_TOKEN), "lib": ("niphas", LIB_TOKEN)}
"""The forge's two private repositories: (user, token) each."""


def private_repos(make_repo: Callable[..., GitRepo]) -> tuple[GitRepo, GitRepo]:
    """`lib` (its greeting.txt committed) and `app` (empty), served by a forge with TOKENS."""
    lib, app = make_repo("lib"), make_repo("app")
    (lib.dir / "greeting.txt").write_text("hello from a private input")
    lib.git("add", "greeting.txt")
    lib.git("commit", "-q", "-m", "greeting")
    return lib, app


async def commit_private_flake(app: GitRepo, lib: GitRepo, forge: GitForge, tools: NixTools) -> str:
    """Commit into `app` the flake reading `lib` through the forge, locked; its sha."""
    flake = private_flake(tools, forge.repo_url("lib"))
    return await asyncio.to_thread(
        commit_locked_to, app, flake, f"file://{lib.dir}", forge.repo_url("lib")
    )


async def test_private_flake_and_input_are_fetched_with_their_own_tokens(
    bus: Bus,
    tmp_path: Path,
    nix_tools: NixTools,
    make_repo: Callable[..., GitRepo],
    eval_settings: EvalSettings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    lib, app = private_repos(make_repo)
    async with git_forge(tmp_path / "forge", TOKENS) as forge:
        commit = await commit_private_flake(app, lib, forge, nix_tools)
        app_url = forge.repo_url("app")
        allowed = [f"{forge.url}/*", f"path:{nix_tools.path}"]
        token_file = tmp_path / "secrets" / "app-token"
        token_file.parent.mkdir()
        token_file.write_text(APP_TOKEN + "\n")
        credentials = tmp_path / "secrets" / "git-credentials.yaml"
        credentials.write_text(yaml.safe_dump({
            app_url: {"username": "niphas", "token_file": str(token_file)},
            forge.repo_url("lib"): {"username": "niphas", "token": LIB_TOKEN},
        }))  # fmt: skip

        # Without credentials: refused by the forge, a failed eval.done saying so.
        anonymous = eval_settings.model_copy(update={"allowed_refs": allowed, "max_deliver": 1})
        worker = await build_worker(bus, anonymous)
        async with serving(bus, [worker.subscription()]):
            await bus.publish(push_for_url(app, app_url, commit))
            [refused] = await wait_for(bus, 1)
        assert refused.status == "failed"
        assert "could not read Username" in (refused.error or ""), refused.error

        # With the credentials file: evaluated, each repository with its own token.
        forge.seen.clear()
        private = anonymous.model_copy(
            update={"git_credentials_file": credentials, "durable": "private-workers"}
        )
        worker = await build_worker(bus, private)
        async with serving(bus, [worker.subscription()]):
            await bus.publish(push_for_url(app, app_url, commit, delivery="again"))
            dones = await wait_for(bus, 2)
        done = dones[-1]
        assert done.status == "succeeded", done.error
        [attr] = done.attributes
        assert attr.drv_path is not None
        drv = Path(attr.drv_path).read_text()
        assert "hello from a private input" in drv

    assert forge.authorizations("app") - {None} == {basic("niphas", APP_TOKEN)}
    assert forge.authorizations("lib") - {None} == {basic("niphas", LIB_TOKEN)}
    # No token in an event, a log line, or a file left in the worker's state.
    events = json.dumps([d.model_dump(mode="json") for d in dones])
    for token in (APP_TOKEN, LIB_TOKEN):
        assert token not in events
        assert token not in caplog.text
        for path in (eval_settings.state_dir).rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert token.encode() not in path.read_bytes(), path


def push_for_url(repo: GitRepo, url: str, commit: str, delivery: str = "first") -> PushReceived:
    push = push_for(repo, commit)
    return push.model_copy(update={"repository": url, "delivery_id": delivery})


async def wait_for(bus: Bus, count: int, timeout_s: float = 120.0) -> list[EvalDone]:
    async def poll() -> list[EvalDone]:
        while len(found := await eval_dones(bus)) < count:
            await asyncio.sleep(0.1)
        return found

    return await asyncio.wait_for(poll(), timeout_s)


async def test_private_flake_over_ssh_with_a_deploy_key(
    bus: Bus,
    tmp_path: Path,
    make_repo: Callable[..., GitRepo],
    eval_settings: EvalSettings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    app = make_repo("app")
    commit = await asyncio.to_thread(app.commit, greeting="served over ssh")
    async with ssh_forge(tmp_path / "forge", tmp_path / "sshd") as forge:
        url = f"{forge.url}{app.dir}/.git"
        credentials = tmp_path / "git-credentials.yaml"
        credentials.write_text(yaml.safe_dump({
            f"{forge.url}/": {"ssh_key_file": str(forge.key_file),
                              "known_hosts_file": str(forge.known_hosts)},
        }))  # fmt: skip
        allowed = [f"{forge.url}/*", *eval_settings.allowed_refs]
        anonymous = eval_settings.model_copy(update={"allowed_refs": allowed, "max_deliver": 1})
        worker = await build_worker(bus, anonymous)
        async with serving(bus, [worker.subscription()]):
            await bus.publish(push_for_url(app, url, commit))
            [refused] = await wait_for(bus, 1)
        assert refused.status == "failed"
        assert "Could not read from remote repository" in (refused.error or ""), refused.error

        keyed = anonymous.model_copy(
            update={"git_credentials_file": credentials, "durable": "ssh-workers"}
        )
        worker = await build_worker(bus, keyed)
        async with serving(bus, [worker.subscription()]):
            await bus.publish(push_for_url(app, url, commit, delivery="again"))
            dones = await wait_for(bus, 2)
    done = dones[-1]
    assert done.status == "succeeded", done.error
    assert "served over ssh" in Path(str(done.attributes[0].drv_path)).read_text()
    key = forge.key_file.read_text().splitlines()[1]  # a line of the private key
    assert key not in json.dumps([d.model_dump(mode="json") for d in dones])
    assert key not in caplog.text


def test_a_missing_credentials_file_means_public_repositories_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The manifests' Secret is optional: its file may be absent, and appear later."""
    file = tmp_path / "git" / "credentials.yaml"
    caplog.set_level(logging.INFO, logger="niphas_eval.credentials")
    credentials = GitCredentials(file)
    url = "https://git.example.com/acme/private.git"
    assert credentials.for_urls([url]) == [] and credentials.for_urls([url]) == []
    assert [r.levelname for r in caplog.records] == ["INFO"]
    file.parent.mkdir()
    file.write_text(yaml.safe_dump({url: {"token": "t0ken"}}))
    [entry] = credentials.for_urls([url])
    assert entry.url == url
