"""Hostile flakes against the evaluation worker (real nats-server, real nix): each tries to reach
something outside its own sources and allowlisted inputs (the worker's environment, a host
file, a non-allowlisted server) and gets one failed `eval.done` saying why, while a canary (a
random value in the worker's environment as NIPHAS_NATS_PASSWORD and in a host file) appears in
no eval.done, no log record and no error text. A merely unusual flake (several allowlisted
inputs, a failing attribute) still evaluates cleanly."""

from __future__ import annotations

import asyncio
import http.server
import logging
import secrets
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from niphas_common.bus.bus import Bus
from niphas_eval.app import build_worker
from niphas_eval.settings import EvalSettings
from niphas_eval.worker import EvalWorker
from niphas_schemas import EvalDone
from tests.helpers import serving
from tests.niphas_eval.conftest import GitRepo, eval_dones, flake_nix, push_for
from tests.nix_harness import NixTools, nix_system

pytestmark = pytest.mark.nix

SYSTEM = nix_system()


@dataclass(frozen=True)
class Canary:
    value: str
    host_dir: Path
    """A host directory outside the allowlist holding `secret` (the canary)."""

    def absent_from(self, dones: list[EvalDone], caplog: pytest.LogCaptureFixture) -> None:
        for done in dones:
            assert self.value not in done.model_dump_json()
        assert self.value not in caplog.text
        for record in caplog.records:
            assert self.value not in record.getMessage()


@pytest.fixture
def canary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> Canary:
    value = f"canary-{secrets.token_hex(16)}"
    monkeypatch.setenv("NIPHAS_NATS_PASSWORD", value)
    host = tmp_path / "host"
    host.mkdir()
    (host / "secret").write_text(value + "\n")
    caplog.set_level(logging.DEBUG)
    return Canary(value, host)


async def evaluate(bus: Bus, worker: EvalWorker, repo: GitRepo, commit: str) -> EvalDone:
    async with serving(bus, [worker.subscription()]):
        await bus.publish(push_for(repo, commit))
        while not (dones := await eval_dones(bus)):
            await asyncio.sleep(0.05)
    [done] = dones
    return done


def leaking_flake(tools: NixTools, inputs: str, package: str) -> str:
    """A flake whose `default` package is `package` (which may use the input `host`): the
    canary would come back in the attribute's error message or the failed result."""
    return (
        flake_nix(tools, packages=f"leak = {package};")
        .replace("inputs.tools =", f"{inputs}\n  inputs.tools =")
        .replace("outputs = { self, tools }", "outputs = { self, tools, ... }@inputs")
    )


IFD_ENVIRON = """\
builtins.readFile (derivation {
  inherit system; name = "environ"; builder = bb;
  args = [ "sh" "-c" "${bb} cat /proc/self/environ /proc/1/environ > $out" ];
})"""


async def test_import_from_derivation_is_refused_naming_the_setting(
    bus: Bus,
    worker: EvalWorker,
    make_repo: Callable[..., GitRepo],
    canary: Canary,
    caplog: pytest.LogCaptureFixture,
) -> None:
    repo = make_repo()
    commit = repo.commit(leaking_flake(repo.tools, "", f"throw ({IFD_ENVIRON})"))
    done = await evaluate(bus, worker, repo, commit)
    assert done.status == "failed"
    assert "import-from-derivation is disabled" in (done.error or "")
    assert "NIPHAS_EVAL_ALLOW_IMPORT_FROM_DERIVATION" in (done.error or "")
    canary.absent_from([done], caplog)


FOD_ENV = """\
builtins.readFile (derivation {
  inherit system; name = "leak"; builder = bb;
  impureEnvVars = [ "NIPHAS_NATS_PASSWORD" ];
  outputHashMode = "flat"; outputHashAlgo = "sha256";
  outputHash = "0000000000000000000000000000000000000000000000000000";
  args = [ "sh" "-c" "echo \\"leaked:[$NIPHAS_NATS_PASSWORD]\\" >&2; exit 1" ];
})"""


async def test_with_ifd_allowed_builders_still_see_none_of_the_workers_environment(
    bus: Bus,
    eval_settings: EvalSettings,
    make_repo: Callable[..., GitRepo],
    canary: Canary,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The operator opted in to IFD: a fixed-output builder asks for the worker's NATS password
    # through impureEnvVars and prints it into the build log that the failure quotes.
    settings = eval_settings.model_copy(update={"allow_import_from_derivation": True})
    worker = await build_worker(bus, settings)
    repo = make_repo()
    commit = repo.commit(leaking_flake(repo.tools, "", FOD_ENV))
    done = await evaluate(bus, worker, repo, commit)
    assert done.status == "failed"
    # Nix ran the builder: its log line is in the failure, with nothing between the brackets.
    assert "leaked:[]" in (done.error or ""), done.error
    canary.absent_from([done], caplog)


def refused(done: EvalDone, *words: str) -> None:
    assert done.status == "failed"
    assert done.attributes == ()
    for word in words:
        assert word in (done.error or ""), done.error


async def test_path_input_to_a_host_directory_is_refused_naming_it(
    bus: Bus,
    worker: EvalWorker,
    make_repo: Callable[..., GitRepo],
    canary: Canary,
    caplog: pytest.LogCaptureFixture,
) -> None:
    repo = make_repo()
    inputs = f'inputs.host = {{ url = "path:{canary.host_dir}"; flake = false; }};'
    leak = 'throw (builtins.readFile "${inputs.host}/secret")'
    commit = repo.commit(leaking_flake(repo.tools, inputs, leak))  # locked by the author
    done = await evaluate(bus, worker, repo, commit)
    refused(done, "flake input refused", "'host'", f"path:` input ({canary.host_dir})")
    canary.absent_from([done], caplog)


async def test_input_missing_from_the_committed_lock_is_never_fetched(
    bus: Bus,
    worker: EvalWorker,
    make_repo: Callable[..., GitRepo],
    canary: Canary,
    caplog: pytest.LogCaptureFixture,
) -> None:
    repo = make_repo()
    repo.commit()  # a locked flake with only the tools input...
    inputs = f'inputs.host = {{ url = "path:{canary.host_dir}"; flake = false; }};'
    leak = 'throw (builtins.readFile "${inputs.host}/secret")'
    # ...then flake.nix declares a host path input and the stale lock is committed as it was.
    flake = leaking_flake(repo.tools, inputs, leak).replace(
        "{ self, tools,", "{ self, tools, host,"
    )
    commit = repo.commit(flake, lock=False)
    done = await evaluate(bus, worker, repo, commit)
    refused(done, "missing from the committed flake.lock")
    canary.absent_from([done], caplog)


def tarball(tmp_path: Path) -> str:
    src = tmp_path / "outside" / "src"
    src.mkdir(parents=True)
    (src / "data").write_text("from elsewhere\n")
    archive = tmp_path / "outside" / "src.tar.gz"
    subprocess.run(["tar", "-czf", str(archive), "-C", str(src.parent), "src"], check=True)
    return f"file://{archive}"


def outside_repo(tmp_path: Path, tools: NixTools) -> str:
    repo = GitRepo(tmp_path / "outside" / "evil", tools)
    repo.dir.mkdir(parents=True)
    repo.git("init", "-q", "-b", "main")
    (repo.dir / "data").write_text("from elsewhere\n")
    repo.git("add", "data")
    repo.git("commit", "-q", "-m", "data")
    return f"git+file://{repo.dir}"


@pytest.mark.parametrize("kind", ["git", "tarball"])
async def test_input_from_a_url_outside_the_allowlist_is_refused_naming_it(
    bus: Bus,
    worker: EvalWorker,
    make_repo: Callable[..., GitRepo],
    nix_tools: NixTools,
    tmp_path: Path,
    kind: str,
) -> None:
    url = outside_repo(tmp_path, nix_tools) if kind == "git" else tarball(tmp_path)
    repo = make_repo()
    inputs = f'inputs.other = {{ url = "{url}"; flake = false; }};'
    commit = repo.commit(
        leaking_flake(repo.tools, inputs, 'builtins.readFile "${inputs.other}/data"')
    )
    done = await evaluate(bus, worker, repo, commit)
    refused(
        done, "flake input refused", "'other'", "matches no pattern of NIPHAS_EVAL_ALLOWED_REFS"
    )


@pytest.mark.parametrize(
    "path", ["/etc/passwd", "/proc/self/environ", "HOST"], ids=["passwd", "environ", "host-file"]
)
async def test_reading_an_absolute_host_path_fails(
    bus: Bus,
    worker: EvalWorker,
    make_repo: Callable[..., GitRepo],
    canary: Canary,
    caplog: pytest.LogCaptureFixture,
    path: str,
) -> None:
    path = str(canary.host_dir / "secret") if path == "HOST" else path
    repo = make_repo()
    commit = repo.commit(leaking_flake(repo.tools, "", f'throw (builtins.readFile "{path}")'))
    done = await evaluate(bus, worker, repo, commit)
    refused(done, "may read only the flake's own sources", f"access to absolute path '{path}'")
    assert "root:" not in (done.error or "")
    canary.absent_from([done], caplog)


async def test_get_env_sees_nothing_of_the_worker(
    bus: Bus,
    worker: EvalWorker,
    make_repo: Callable[..., GitRepo],
    canary: Canary,
    caplog: pytest.LogCaptureFixture,
) -> None:
    repo = make_repo()
    leak = 'throw ("env:[" + builtins.getEnv "NIPHAS_NATS_PASSWORD" + "]")'
    commit = repo.commit(leaking_flake(repo.tools, "", leak))
    done = await evaluate(bus, worker, repo, commit)
    assert done.status == "succeeded", done.error  # the other package still evaluates
    [attr] = [a for a in done.attributes if a.attribute == "leak"]
    assert "env:[]" in (attr.error or ""), attr.error
    canary.absent_from([done], caplog)


@pytest.fixture
def http_server() -> Iterator[tuple[str, list[str]]]:
    """A loopback HTTP server recording the paths it is asked for."""
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"payload\n")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()
    server.server_close()


async def test_fetch_with_a_hash_to_a_url_outside_the_allowlist_never_leaves(
    bus: Bus,
    worker: EvalWorker,
    make_repo: Callable[..., GitRepo],
    http_server: tuple[str, list[str]],
) -> None:
    base, requests = http_server
    repo = make_repo()
    fetch = (
        f'builtins.readFile (builtins.fetchurl {{ url = "{base}/exfil"; '
        'sha256 = "0000000000000000000000000000000000000000000000000000"; })'
    )
    commit = repo.commit(leaking_flake(repo.tools, "", fetch))
    done = await evaluate(bus, worker, repo, commit)
    refused(done, "fetch only from NIPHAS_EVAL_ALLOWED_REFS", f"'{base}/exfil' is forbidden")
    assert requests == []


async def test_unusual_flake_with_several_allowlisted_inputs_evaluates_cleanly(
    bus: Bus, worker: EvalWorker, make_repo: Callable[..., GitRepo]
) -> None:
    lib = make_repo("lib")
    lib.commit('{ outputs = { self }: { greeting = "from-lib"; }; }')
    data = make_repo("data")
    data.commit(None, lock=False)  # not a flake that is evaluated: a plain source input
    repo = make_repo()
    inputs = (
        f'inputs.lib.url = "git+{lib.url}";\n'
        f'  inputs.data = {{ url = "git+{data.url}"; flake = false; }};'
    )
    package = (
        "derivation { inherit system; name = inputs.lib.greeting; builder = bb; "
        'args = [ "sh" "-c" "${bb} cp ${inputs.data}/flake.nix $out" ]; } // '
        '{ broken = throw "unused"; }'
    )
    flake = leaking_flake(repo.tools, inputs, package).replace(
        "default = app;", 'default = app; failing = throw "fails on purpose";'
    )
    commit = repo.commit(flake)
    done = await evaluate(bus, worker, repo, commit)
    assert done.status == "succeeded", done.error
    attrs = {a.attribute: a for a in done.attributes}
    assert attrs["leak"].name == "from-lib" and attrs["leak"].error is None
    assert "fails on purpose" in (attrs["failing"].error or "")
