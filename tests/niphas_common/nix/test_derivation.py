"""The ATerm `.drv` parser against real `nix-instantiate`d derivations (several outputs, a
fixed-output derivation, escaped strings) compared with `nix show-derivation`, and against
malformed input from an untrusted uploader."""

from __future__ import annotations

from pathlib import Path

import pytest

from niphas_common.nix.derivation import DerivationError, parse_derivation
from niphas_common.nix.runner import NixRunner
from niphas_common.nix.store_path import StorePath

from .drv_samples import closure, instantiate, references

OUT = "/nix/store/9pazj90bsfyd12w3dc0nf4ck8ricixxq-b"
DEP = "/nix/store/23ppid0vmg3a5k4qp2lv58azjaypsrfq-a.drv"
SRC = "/nix/store/i8f50vssr0gamrcmw7788xjahhqsx2hj-src"
SAMPLE = (
    f'Derive([("out","{OUT}","","")],[("{DEP}",["dev","out"])],["{SRC}"],"x86_64-linux",'
    r'"/bin/sh",["-c","echo \"q\\\\x\""],[("env","a\nb\t\"c\\d"),("out","' + OUT + '")])'
)


def test_parses_outputs_inputs_and_escapes() -> None:
    drv = parse_derivation(SAMPLE.encode())
    assert drv.outputs == {"out": StorePath.parse(OUT)}
    assert drv.input_drvs == {StorePath.parse(DEP): ("dev", "out")}
    assert drv.input_srcs == (StorePath.parse(SRC),)
    assert drv.references == {StorePath.parse(DEP), StorePath.parse(SRC)}
    assert (drv.platform, drv.builder) == ("x86_64-linux", "/bin/sh")
    assert drv.env == {"env": 'a\nb\t"c\\d', "out": OUT}


@pytest.mark.nix
def test_matches_nix_show_derivation(tmp_path: Path, nix_runner: NixRunner) -> None:
    top = instantiate(tmp_path, nix_runner)
    shown = nix_runner.run("nix", "show-derivation", "-r", top).json()
    drvs = [p for p in closure(nix_runner, top) if p.endswith(".drv")]
    assert set(drvs) == set(shown) and len(drvs) == 3
    for path in drvs:
        drv = parse_derivation(Path(path).read_bytes())
        want = shown[path]
        assert {k: str(v) for k, v in drv.outputs.items()} == {
            k: o["path"] for k, o in want["outputs"].items()
        }
        assert {str(k): list(v) for k, v in drv.input_drvs.items()} == want["inputDrvs"]
        assert sorted(map(str, drv.input_srcs)) == sorted(want["inputSrcs"])
        assert sorted(map(str, drv.references)) == sorted(references(nix_runner, path))
        assert (drv.platform, drv.builder) == (want["system"], want["builder"])
        assert drv.env == want["env"]
    assert any(len(shown[p]["outputs"]) == 2 for p in drvs)
    assert any('"quoted" back\\slash \r' in shown[p]["env"].get("tricky", "") for p in drvs)


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"Derive(",
        b'Derive([],[],[],"x","y",[],[])',  # no output
        SAMPLE.encode() + b" ",
        SAMPLE.replace("Derive", "Derivx").encode(),
        SAMPLE.replace(f'"{SRC}"', '"/etc/passwd"').encode(),
        SAMPLE.replace(f'("{DEP}",', f'("{SRC}",').encode(),  # input drv not a .drv
        SAMPLE.replace('"x86_64-linux"', '["x86_64-linux"]').encode(),
        SAMPLE[:-20].encode(),
        b'Derive([("out","' + b"\\" * 3,
        b"Derive(" + b"[" * 100 + b"]" * 100 + b")",
        b'Derive([("out","\xff","","")])',
    ],
)
def test_refuses_malformed(bad: bytes) -> None:
    with pytest.raises(DerivationError):
        parse_derivation(bad)
