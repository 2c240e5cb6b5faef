"""Hostile NARs: traversal and malformed names, unsorted or duplicate entries, a symlink
followed by a write through it, truncation at every byte, bad framing, limits, and hypothesis
fuzzing. Each must raise NarError (and nothing else) and leave nothing behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from niphas_common.nix.errors import NarError
from niphas_common.nix.nar_parser import NarLimits, parse
from niphas_common.nix.nar_restore import NarRestorer, restore

from . import nar_model
from .nar_model import Dir, File, Link, s

MAGIC = s(b"nix-archive-1")


def entry(name: bytes, node: bytes) -> bytes:
    return s(b"entry") + s(b"(") + s(b"name") + s(name) + s(b"node") + node + s(b")")


def directory(*entries: bytes) -> bytes:
    return s(b"(") + s(b"type") + s(b"directory") + b"".join(entries) + s(b")")


def regular(data: bytes) -> bytes:
    return nar_model.encode_node(File(data))


def symlink(target: bytes) -> bytes:
    return nar_model.encode_node(Link(target))


def assert_rejected(nar: bytes, tmp_path: Path, match: str | None = None) -> None:
    dest = tmp_path / "out"
    with pytest.raises(NarError, match=match):
        restore(nar, dest)
    assert not os.path.lexists(dest), "partial output left behind"
    assert list(tmp_path.iterdir()) == [], "stray files next to the destination"


@pytest.mark.parametrize(
    "name", [b"..", b".", b"/", b"a/b", b"../../etc", b"", b"a\0b", b"/etc/passwd"]
)
def test_bad_names(name: bytes, tmp_path: Path) -> None:
    nar = MAGIC + directory(entry(b"0-first", regular(b"x")), entry(name, regular(b"evil")))
    assert_rejected(nar, tmp_path, "invalid entry name")


def test_unsorted_entries(tmp_path: Path) -> None:
    nar = MAGIC + directory(entry(b"b", regular(b"")), entry(b"a", regular(b"")))
    assert_rejected(nar, tmp_path, "unsorted")


def test_duplicate_entries(tmp_path: Path) -> None:
    nar = MAGIC + directory(entry(b"a", regular(b"1")), entry(b"a", regular(b"2")))
    assert_rejected(nar, tmp_path, "duplicate")


def test_symlink_then_file_through_it(tmp_path: Path) -> None:
    victim = tmp_path.parent / f"{tmp_path.name}-victim"
    victim.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    link = entry(b"a", symlink(os.fsencode(victim)))
    # The same name again as a directory (would write into the symlink's target) ...
    again = entry(b"a", directory(entry(b"pwned", regular(b"x"))))
    assert_rejected(MAGIC + directory(link, again), work)
    # ... or a name reaching through it.
    through = entry(b"a/pwned", regular(b"x"))
    assert_rejected(MAGIC + directory(link, through), work)
    assert list(victim.iterdir()) == []


def test_truncated_at_every_byte(tmp_path: Path) -> None:
    tree = Dir({b"d": Dir({b"f": File(b"0123456789", True)}), b"l": Link(b"d/f")})
    nar = nar_model.encode(tree)
    for cut in range(len(nar)):
        assert_rejected(nar[:cut], tmp_path, "truncated")


@pytest.mark.parametrize(
    ("nar", "match"),
    [
        (s(b"nix-archive-2") + regular(b""), "bad magic"),
        (MAGIC + s(b"(") + s(b"type") + s(b"fifo") + s(b")"), "unknown entry type"),
        (MAGIC + regular(b"x") + s(b"junk"), "trailing data"),
        (MAGIC + regular(b"x")[:-24] + b"x\x01" + bytes(6) + s(b")"), "non-zero padding"),
        (MAGIC + regular(b"")[:-40] + s(b"executable") + s(b"yes"), "empty"),
        (MAGIC + symlink(b"a\0b"), "symlink target"),
        (MAGIC + symlink(b""), "symlink target"),
        (MAGIC + b"\xff" * 8, "over the limit"),
        (MAGIC + directory(s(b"entri")), "expected 'entry'"),
    ],
)
def test_bad_framing(nar: bytes, match: str, tmp_path: Path) -> None:
    assert_rejected(nar, tmp_path, match)


def test_padding_of_strings_must_be_zero(tmp_path: Path) -> None:
    bad_magic = MAGIC[:-1] + b"\x01"
    assert_rejected(bad_magic + regular(b""), tmp_path, "padding")


def test_limits(tmp_path: Path) -> None:
    deep: nar_model.Node = File(b"x")
    for _ in range(6):
        deep = Dir({b"d": deep})
    nar = nar_model.encode(deep)
    with pytest.raises(NarError, match="deeper"):
        restore(nar, tmp_path / "a", NarLimits(max_depth=4))
    with pytest.raises(NarError, match="larger than the limit"):
        restore(nar, tmp_path / "b", NarLimits(max_nar_size=len(nar) - 1))
    with pytest.raises(NarError, match="more than 3 entries"):
        restore(nar, tmp_path / "c", NarLimits(max_entries=3))
    with pytest.raises(NarError, match="over the limit"):
        parse(nar_model.encode(Dir({b"n" * 20: File(b"")})), NarLimits(max_name_len=19))
    assert list(tmp_path.iterdir()) == []
    assert restore(nar, tmp_path / "ok", NarLimits(max_depth=6, max_nar_size=len(nar))) == len(nar)


def test_existing_destination_is_left_alone(tmp_path: Path) -> None:
    dest = tmp_path / "taken"
    dest.mkdir()
    (dest / "keep").write_text("mine")
    with pytest.raises(NarError):
        restore(nar_model.encode(Dir({})), dest)
    assert (dest / "keep").read_text() == "mine"


def test_abort_midway_removes_output(tmp_path: Path) -> None:
    nar = nar_model.encode(Dir({b"a": File(b"x" * 1000), b"b": Dir({b"c": File(b"y")})}))
    restorer = NarRestorer(tmp_path / "out")
    restorer.feed(nar[: len(nar) // 2])
    assert (tmp_path / "out" / "a").exists()
    restorer.abort()
    assert list(tmp_path.iterdir()) == []


def test_feed_after_error_keeps_failing(tmp_path: Path) -> None:
    restorer = NarRestorer(tmp_path / "out")
    with pytest.raises(NarError):
        restorer.feed(b"\x01" * 16)
    with pytest.raises(NarError):
        restorer.feed(MAGIC)
    with pytest.raises(NarError):
        restorer.finish()


_VALID = nar_model.encode(
    Dir({b"a": File(b"hello", True), b"b": Link(b"a"), b"c": Dir({b"d": File(b"")})})
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data: bytes) -> None:
    with contextlib.suppress(NarError):
        parse(MAGIC + data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    edits=st.lists(
        st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), min_size=1, max_size=4
    ),
    cut=st.integers(0, len(_VALID)),
)
def test_fuzz_mutated_nar_unpack(edits: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(_VALID)
    for pos, value in edits:
        data[pos] = value
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(tmp, "out")
        try:
            restore(bytes(data[:cut]) if cut % 2 else bytes(data), dest)
        except NarError:
            assert os.listdir(tmp) == []
