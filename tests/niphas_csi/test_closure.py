"""Closures read from the store's own Nix database: the same closure `nix path-info --recursive`
gives, invalid paths reported as missing beside the closure of the valid ones, an empty store
(no database yet) holding nothing, a damaged database refused with an error naming it, and a
publish through the socket that starts no process at all."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from niphas_csi.closure import DB_FILE, StoreDb, StoreDbError
from tests.nix_harness import BuiltClosure

from .conftest import Driver, Node

pytestmark = [pytest.mark.root, pytest.mark.nix]

ABSENT = f"/nix/store/{'0' * 32}-absent"

_started: list[str] | None = None
"""Processes started while a test records (None: not recording)."""


def _audit(event: str, args: tuple[object, ...]) -> None:
    if _started is not None and event in ("subprocess.Popen", "os.posix_spawn", "os.fork"):
        _started.append(f"{event} {args[:2]!r}")


sys.addaudithook(_audit)  # hooks cannot be removed; this one only acts while `_started` is set


def test_the_closure_is_what_nix_path_info_gives(node: Node, built_closure: BuiltClosure) -> None:
    presence = StoreDb(node.store_root, 5).presence([str(built_closure.app)])
    expected = node.runner.path_info([built_closure.app], recursive=True)
    assert presence.missing == ()
    assert presence.closure == tuple(sorted(expected))
    assert len(presence.closure) > 1  # app -> lib, tools: a real graph was walked


def test_invalid_paths_are_missing_and_valid_ones_keep_their_closure(
    node: Node, built_closure: BuiltClosure
) -> None:
    lib = next(str(p) for p in built_closure.paths if p.name.endswith("-lib"))
    presence = StoreDb(node.store_root, 5).presence([ABSENT, lib])
    assert presence.missing == (ABSENT,)
    assert presence.closure == tuple(sorted(node.runner.path_info([lib], recursive=True)))


def test_a_store_without_a_database_holds_nothing(bare_node: Node) -> None:
    assert not (bare_node.store_root / DB_FILE).exists()
    presence = StoreDb(bare_node.store_root, 5).presence([ABSENT])
    assert presence == type(presence)((), (ABSENT,))


def test_a_damaged_database_is_an_error_naming_it(tmp_path: Path) -> None:
    db = tmp_path / DB_FILE
    db.parent.mkdir(parents=True)
    db.write_bytes(b"not a database, " * 256)
    with pytest.raises(StoreDbError, match=str(db)):
        StoreDb(tmp_path, 5).presence([ABSENT])


async def test_a_publish_starts_no_process(
    driver: Driver, node: Node, built_closure: BuiltClosure
) -> None:
    global _started
    target = node.target()
    _started = []
    try:
        await driver.publish("csi-noproc", target, str(built_closure.app))
        await driver.unpublish("csi-noproc", target)
        started, _started = _started, None
    finally:
        _started = None
    assert started == []
