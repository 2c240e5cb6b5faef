"""The nix CLI runner: `$ cmd` logging, errors carrying stderr, timeouts that kill the
build, chroot stores, and `path-info --json` in both Nix 2.8's list and newer Nix's object
shape."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from niphas_common.nix.errors import CommandError, CommandTimeout, NixError
from niphas_common.nix.hashes import Hash
from niphas_common.nix.runner import NixRunner, parse_path_info
from niphas_common.nix.store_path import StoreDir
from tests.nix_harness import NixTools, nix_system

H = "0" * 32
NAR = Hash.of(b"x")


@pytest.mark.nix
def test_logs_the_command(nix_runner: NixRunner, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="niphas_common.nix.runner")
    result = nix_runner.run("nix", "--version")
    assert "nix" in result.text
    assert "$ nix --version" in caplog.messages


@pytest.mark.nix
def test_error_carries_stderr(nix_runner: NixRunner) -> None:
    missing = f"/nix/store/{H}-missing"
    with pytest.raises(CommandError) as info:
        nix_runner.run("nix", "path-info", missing)
    err = info.value
    assert err.returncode not in (0, None)
    assert missing in err.stderr
    assert missing in str(err)
    assert err.cmd == ["nix", "path-info", missing]
    assert nix_runner.path_info([missing]) == {}  # Nix 2.8: exit 0 with valid: false


def test_missing_program() -> None:
    with pytest.raises(CommandError, match="cannot start"):
        NixRunner().run("/nonexistent/nix", "--version")


def _running(marker: str) -> bool:
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker.encode() in cmdline.read_bytes():
                return True
        except OSError:
            continue
    return False


def _assert_gone(marker: str) -> None:
    """The builder must not outlive the timed-out nix (it runs in its own session)."""
    deadline = time.monotonic() + 10
    while _running(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(marker)


def _sleeper(tools: NixTools, seconds: str) -> str:
    return (
        f'derivation {{ name = "sleeper"; system = "{nix_system()}"; '
        f'builder = "${{builtins.storePath "{tools.path}"}}/bin/busybox"; '
        f'args = [ "sleep" "{seconds}" ]; }}'
    )


@pytest.mark.nix
def test_timeout_kills_the_build(nix_runner: NixRunner, nix_tools: NixTools) -> None:
    seconds = f"{time.time_ns() % 1000 + 60}.5"  # unique, to find the builder process
    started = time.monotonic()
    with pytest.raises(CommandTimeout, match="timed out"):
        nix_runner.run(
            "nix",
            "build",
            "--no-link",
            "--impure",
            "--expr",
            _sleeper(nix_tools, seconds),
            timeout=2,
        )
    assert time.monotonic() - started < 20
    _assert_gone(f"sleep\0{seconds}")


@pytest.mark.nix
async def test_async_timeout(nix_runner: NixRunner, nix_tools: NixTools) -> None:
    seconds = f"{time.time_ns() % 1000 + 60}.25"
    with pytest.raises(CommandTimeout):
        await nix_runner.arun(
            "nix",
            "build",
            "--no-link",
            "--impure",
            "--expr",
            _sleeper(nix_tools, seconds),
            timeout=2,
        )
    _assert_gone(f"sleep\0{seconds}")
    result = await nix_runner.arun("nix", "--version")
    assert result.returncode == 0


@pytest.mark.nix
def test_chroot_store(nix_runner: NixRunner, tmp_path: Path) -> None:
    root = tmp_path / "node1"
    node = NixRunner(store=str(root))
    src = tmp_path / "payload"
    src.mkdir()
    (src / "f").write_text("node-local")
    path = node.add_to_store(src)
    assert StoreDir(root=root).real_path(path).joinpath("f").read_text() == "node-local"
    info = node.path_info([path])[str(path)]
    assert info.nar_size > 0
    assert nix_runner.path_info([path]) == {}  # not in the machine's own store


ENTRY = {
    "narHash": NAR.nix32,
    "narSize": 8,
    "references": [f"/nix/store/{H}-a"],
    "deriver": f"/nix/store/{H}-a.drv",
    "signatures": ["k:sig"],
}


def test_path_info_shapes_agree() -> None:
    old = [
        {"path": f"/nix/store/{H}-a", **ENTRY},
        {"path": f"/nix/store/{'1' * 32}-gone", "valid": False},
    ]
    new = {
        f"/nix/store/{H}-a": {**ENTRY, "narHash": NAR.sri, "ca": None},
        f"/nix/store/{'1' * 32}-gone": None,
    }
    parsed_old, parsed_new = parse_path_info(old), parse_path_info(new)
    assert parsed_old == parsed_new
    assert list(parsed_old) == [f"/nix/store/{H}-a"]
    info = parsed_old[f"/nix/store/{H}-a"]
    assert info.nar_hash == NAR
    assert info.deriver is not None
    assert info.deriver.name == "a.drv"


@pytest.mark.parametrize(
    "bad", ["nope", [{"path": 3, **ENTRY}], {f"/nix/store/{H}-a": {"narHash": "x"}}]
)
def test_path_info_garbage(bad: object) -> None:
    with pytest.raises(NixError):
        parse_path_info(bad)
