"""Reading the holder state (`niphas-holders`, layout in `niphas_schemas.holders`) into an index,
and the one-time move from the old format (the index replayed from `path.available`).

Every record is checked against its key before it reaches the index, because anyone who can
write to the bucket can write anything: a key that is neither a path record nor a node record,
a value that does not decode, a body whose path, holder kind, node or cache URL is not the
one its key names, a node record for another node. Each such record is skipped with one
warning and counted in `niphas_mesh_ignored_records_total{reason}`; the index never learns an
address from it. (A record that passes still only advises: every download is verified.)
"""

from __future__ import annotations

import asyncio
import logging

from pydantic import ValidationError

from niphas_common.bus.bus import Bus
from niphas_common.bus.codec import encode
from niphas_common.bus.state import State
from niphas_schemas import PathAvailable
from niphas_schemas.holders import NodeRecord, node_of_key, split_key

from .index import HolderIndex
from .metrics import IGNORED_RECORDS

log = logging.getLogger(__name__)

FORMAT_KEY = "format"
"""Set once the old format's holders were copied in (by whichever agent started first)."""
FORMAT = b"holders-v1"
UPGRADE_READ_S = 60.0
"""Seconds allowed for reading the old stream during the upgrade."""


def apply_record(index: HolderIndex, key: str, value: bytes | None, revision: int) -> bool:
    """Feed one record (None: deleted) to `index`; False when it was ignored."""
    split = split_key(key)
    if split is not None:
        hash_part, holder = split
        if value is None:
            index.remove(hash_part, holder, revision)
            return True
        try:  # pydantic's own JSON parser: a view of a million records reads in seconds
            event = PathAvailable.model_validate_json(value)
        except ValidationError as exc:
            return _ignored(key, "garbage", f"not a path.available body ({_first(exc)})")
        if event.state_key != key:
            return _ignored(
                key, "mismatch", f"its body speaks of {event.holder_kind} {event.holder} "
                f"at {event.holder_url} about {event.store_path} (key {event.state_key})"
            )  # fmt: skip
        if event.state == "withdrawn":
            return _ignored(key, "mismatch", "a withdrawal is a deleted key, not a value")
        index.apply(event, revision)
        return True
    node = node_of_key(key)
    if node is not None:
        if value is None:
            index.set_node(node, None, revision)
            return True
        try:
            record = NodeRecord.model_validate_json(value)
        except ValidationError as exc:
            return _ignored(key, "garbage", f"not a node record ({_first(exc)})")
        if record.node != node:
            return _ignored(key, "mismatch", f"its body names node {record.node}")
        index.set_node(node, record, revision)
        return True
    if key == FORMAT_KEY:
        return True
    return _ignored(key, "key", "not a holder or node key")


def _first(exc: ValidationError) -> str:
    err = exc.errors()[0]
    return f"{'.'.join(str(p) for p in err['loc']) or '<body>'}: {err['msg']}"


def _ignored(key: str, reason: str, why: str) -> bool:
    log.warning("ignoring holder record %s: %s", key, why)
    IGNORED_RECORDS.labels(reason).inc()
    return False


async def upgrade(bus: Bus, state: State) -> int:
    """Copy what the old format knew (the latest word of each holder about each path, from
    what `path.available` still stores) into the state, once per cluster; how many records
    were written. Records already there win (`create`); node records count only once their
    node registers at the same URL, which an upgraded agent does at start."""
    if await state.get(FORMAT_KEY) is not None:
        return 0
    latest: dict[str, PathAvailable] = {}

    async def replay(event: PathAvailable, _seq: int) -> None:
        if event.state == "withdrawn":
            latest.pop(event.state_key, None)
        else:
            latest[event.state_key] = event

    watch = await bus.watch(PathAvailable, replay, replay=True)
    try:
        async with asyncio.timeout(UPGRADE_READ_S):
            while not watch.caught_up:  # noqa: ASYNC110 (unreadable events set no event)
                await asyncio.sleep(0.05)
    except TimeoutError:
        log.warning("holder state: path.available not read within %.0f s; the copy of the "
                    "old format's holders is left to the next start", UPGRADE_READ_S)  # fmt: skip
        return 0
    finally:
        await watch.stop()
    written = 0
    for key, event in latest.items():
        if event.state == "available" and await state.create(key, encode(event)) is not None:
            written += 1
    await state.create(FORMAT_KEY, FORMAT)
    if written:
        log.info("holder state: %d holdings copied from the path.available stream", written)
    return written
