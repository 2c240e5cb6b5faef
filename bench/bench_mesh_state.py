"""Mesh holder state at scale: a new node's view of who holds what, and traffic per node.

    .venv/bin/python bench/bench_mesh_state.py [--json PATH] [--paths 10000] [--holders 1000]
        [--per-path 1 10 100] [--nodes 2 10 100 1000] [--announced 10]

1. **A new node's holder view.** P paths, each held by K of H holders (node identities), are
   P x K records in the `niphas-holders` state. A new node's router (`BusRouter`, in a fresh
   process) reads them whole until caught up: the time, and the resident memory the view adds
   to the process. Baseline in the same run: the old format, the index rebuilt by replaying the
   same number of `path.available` events (one per holding; a real stream holds more, every
   superseded announcement too, until they expire).
2. **Traffic per node as nodes grow.** N node identities (2..1,000) on one server each
   register, announce A paths and get one want; counted for one node: the wants its consumer
   is given (`path.wanted.<node>`; baseline: the old shared subject, where every node's
   consumer got every want), the holder records its view receives, and the records a CSI
   wait for one path receives.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for bench.report
from nats.js.api import PubAck

from bench.report import Report, Series, add_json_option
from niphas_common.bus.bus import Bus
from niphas_common.bus.codec import encode
from niphas_common.bus.topology import ConsumerSpec, ensure_consumer
from niphas_common.nats_server import EmbeddedNats
from niphas_common.settings import NatsSettings
from niphas_csi.wants import PathWants
from niphas_mesh.agent import want_consumer
from niphas_mesh.holder_state import FORMAT, FORMAT_KEY
from niphas_mesh.index import HolderIndex
from niphas_mesh.router import BusRouter
from niphas_schemas import HOLDERS_BUCKET, NodeRecord, PathAvailable, PathWanted
from niphas_schemas.holders import node_key

NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"
NAR_HASH = "sha256:" + "1" * 52
WINDOW = 2000
"""Publishes in flight at once while writing records."""


def store_path(i: int) -> str:
    digits = ""
    n = i
    for _ in range(32):
        digits += NIX32[n % 32]
        n //= 32
    return f"/nix/store/{digits}-path-{i}"


def node_name(i: int) -> str:
    return f"node-{i}"


def holding(path: int, holder: int) -> PathAvailable:
    name = node_name(holder)
    url = f"http://10.0.{holder // 250}.{holder % 250}:8080"
    return PathAvailable(
        holder_kind="node", holder=name, holder_url=url,
        store_path=store_path(path), nar_hash=NAR_HASH, nar_size=4096 + path,
    )  # fmt: skip


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def publish_all(bus: Bus, items: Sequence[tuple[str, bytes]]) -> None:
    pending: list[asyncio.Future[PubAck]] = []
    for subject, data in items:
        pending.append(await bus.js.publish_async(subject, data))
        if len(pending) >= WINDOW:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)


# -- 1. a new node's holder view -------------------------------------------------------------


async def write_holdings(url: str, paths: int, holders: int, per_path: int) -> int:
    """P x K holdings as state records and, for the baseline, as events; the records' bytes."""
    bus = await Bus.connect(NatsSettings(url=url), name="bench-writer")
    state = await bus.state(HOLDERS_BUCKET)
    await state.create(FORMAT_KEY, FORMAT)  # an upgraded cluster: no replay of the old stream
    for h in range(holders):
        record = NodeRecord(node=node_name(h), url=holding(0, h).holder_url)
        await state.put(node_key(node_name(h)), record.model_dump_json().encode())
    size = 0
    chunk: list[tuple[str, bytes]] = []
    events: list[tuple[str, bytes]] = []
    for p in range(paths):
        for j in range(per_path):
            event = holding(p, (p * per_path + j) % holders)
            body = encode(event)
            size += len(body)
            chunk.append((state.subject(event.state_key), body))
            events.append((PathAvailable.subject, body))
        if len(chunk) >= 50_000:
            await publish_all(bus, chunk)
            await publish_all(bus, events)
            chunk, events = [], []
    await publish_all(bus, chunk)
    await publish_all(bus, events)
    await bus.close()
    return size


async def view_child(url: str, mode: str) -> dict[str, float]:
    """In a fresh process: read the holder view (`state`) or replay the events (`events`)."""
    bus = await Bus.connect(NatsSettings(url=url), name=f"bench-view-{mode}")
    gc.collect()
    before = rss_mb()
    start = time.perf_counter()
    index = HolderIndex()
    if mode == "state":
        router = BusRouter(bus, index)
        await router.start()
        while not router.caught_up:
            await asyncio.sleep(0.01)
        await router.stop()
    else:

        async def apply(event: PathAvailable, seq: int) -> None:
            index.apply(event, seq)

        watch = await bus.watch(PathAvailable, apply, replay=True)
        while not watch.caught_up:
            await asyncio.sleep(0.01)
        await watch.stop()
    elapsed = time.perf_counter() - start
    gc.collect()
    after = rss_mb()
    await bus.close()
    return {"seconds": elapsed, "rss_mb": after - before, "holdings": index.holding_count}


def run_view(url: str, mode: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--view-child", url, mode],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


async def holder_views(report: Report, paths: int, holders: int, per_path: Sequence[int]) -> None:
    xs: list[float] = []
    ours_s: list[float] = []
    base_s: list[float] = []
    mem: list[float] = []
    for k in per_path:
        with tempfile.TemporaryDirectory() as tmp, EmbeddedNats(Path(tmp)) as server:
            size = await write_holdings(server.url, paths, holders, k)
            state = run_view(server.url, "state")
            events = run_view(server.url, "events")
        records = paths * k
        assert state["holdings"] == records == events["holdings"], (state, events)
        label = f"{paths:,} paths x {k} of {holders:,} holders ({records:,} records)"
        print(
            f"{label}: view {state['seconds']:.2f} s, +{state['rss_mb']:.0f} MB; "
            f"replay of the events {events['seconds']:.2f} s, +{events['rss_mb']:.0f} MB; "
            f"records {size / 1e6:.0f} MB"
        )
        replay = "old format: replay of one path.available event per holding"
        report.row(f"new node's holder view, {label}", state["seconds"], "s",
                   baseline=events["seconds"], baseline_name=replay)  # fmt: skip
        report.row(f"memory of that view, {label}", state["rss_mb"], "MB",
                   baseline=events["rss_mb"], baseline_name="old format's index")  # fmt: skip
        xs.append(records)
        ours_s.append(state["seconds"])
        base_s.append(events["seconds"])
        mem.append(state["rss_mb"])
    report.series += [
        Series(
            "view time: a new node reads the holders",
            "state (niphas-holders)",
            xs,
            ours_s,
            "records",
            "s",
        ),
        Series(
            "view time: a new node reads the holders",
            "old format (event replay)",
            xs,
            base_s,
            "records",
            "s",
        ),
        Series(
            "view memory: resident set added", "resident memory added", xs, mem, "records", "MB"
        ),
    ]


# -- 2. traffic per node as nodes grow -------------------------------------------------------


async def traffic(url: str, nodes: int, announced: int) -> dict[str, float]:
    """One round with `nodes` identities; what node-0 receives."""
    bus = await Bus.connect(NatsSettings(url=url), name="bench-traffic")
    me = node_name(0)
    ours = want_consumer(me)
    shared = ConsumerSpec("old-shared", PathWanted.subject, filter=f"{PathWanted.subject}.>")
    for spec in (ours, shared):
        await ensure_consumer(bus.js, spec)
    view = BusRouter(bus)
    await view.start()
    received_bytes = 0
    state = await bus.state(HOLDERS_BUCKET)

    wants = PathWants(bus, me)
    await wants.start()

    async def still_missing(paths: Sequence[str]) -> Sequence[str]:
        return paths

    mine = store_path(0)
    waiting = asyncio.create_task(wants.fetch([mine], "csi:bench", 600.0, still_missing, 600.0))
    await asyncio.sleep(0.1)  # the wait listens and its want is out
    deadline = datetime.now(UTC) + timedelta(hours=1)
    items: list[tuple[str, bytes]] = []
    for n in range(1, nodes):
        name = node_name(n)
        record = NodeRecord(node=name, url=holding(0, n).holder_url).model_dump_json().encode()
        items.append((state.subject(node_key(name)), record))
        want = PathWanted(node=name, store_paths=(mine,), deadline=deadline, requester="csi:x")
        items.append((want.routed_subject, encode(want)))
        for a in range(announced):
            event = holding(a, n)  # every node gained the same closure of `announced` paths
            items.append((state.subject(event.state_key), encode(event)))
    for subject, data in items:
        if subject.startswith("$KV."):
            received_bytes += len(data)
    await publish_all(bus, items)
    answer = holding(0, 0)
    await bus.record(answer)  # node-0's own agent answers the wait
    await asyncio.wait_for(waiting, 60)
    last = await state.last_revision()
    while view.index.last_seq < last:
        await asyncio.sleep(0.01)
    got_ours = (await bus.js.consumer_info(ours.stream, ours.durable)).num_pending or 0
    got_shared = (await bus.js.consumer_info(shared.stream, shared.durable)).num_pending or 0
    result = {
        "wants": float(got_ours),
        "wants_shared": float(got_shared),
        "records": float(view.records_read),
        "record_bytes": float(received_bytes),
        "csi": float(wants.heard),
    }
    await view.stop()
    await bus.close()
    return result


async def traffic_per_node(report: Report, sizes: Sequence[int], announced: int) -> None:
    rows: dict[str, list[float]] = {
        "wants": [], "wants_shared": [], "records": [], "csi": [],
    }  # fmt: skip
    for nodes in sizes:
        with tempfile.TemporaryDirectory() as tmp, EmbeddedNats(Path(tmp)) as server:
            got = await traffic(server.url, nodes, announced)
        print(
            f"{nodes:>5} nodes: node-0's consumer got {got['wants']:.0f} want(s) "
            f"(shared subject: {got['wants_shared']:.0f}); its view received "
            f"{got['records']:.0f} holder records ({got['record_bytes'] / 1e3:.0f} kB); "
            f"a CSI wait heard {got['csi']:.0f}"
        )
        for key in rows:
            rows[key].append(got[key])
        report.row(f"wants a node's consumer is given, {nodes} nodes", got["wants"], "messages",
                   baseline=got["wants_shared"],
                   baseline_name="old shared path.wanted: every node's want",
                   target="1 (its own)", met=got["wants"] == 1)  # fmt: skip
        report.row(f"holder records a node's view receives, {nodes} nodes", got["records"],
                   "records", target=f"<= {nodes} x ({announced} + 1) + 1",
                   met=got["records"] <= nodes * (announced + 1) + 1)  # fmt: skip
        report.row(f"records a CSI wait for one path receives, {nodes} nodes", got["csi"],
                   "records", target="1", met=got["csi"] == 1)  # fmt: skip
    x = [float(n) for n in sizes]
    plot = "traffic per node"
    report.series += [
        Series(plot, "wants given to its consumer: old shared subject", x,
               rows["wants_shared"], "nodes", "messages"),
        Series(plot, "wants given to its consumer: path.wanted.<node>", x, rows["wants"],
               "nodes", "messages"),
        Series(plot, "holder records its view receives", x, rows["records"], "nodes",
               "messages"),
        Series(plot, "records a CSI wait receives", x, rows["csi"], "nodes", "messages"),
    ]  # fmt: skip


async def main(args: argparse.Namespace) -> int:
    report = Report("mesh_state", "Mesh holder state: a new node's view, traffic per node")
    await holder_views(report, args.paths, args.holders, args.per_path)
    await traffic_per_node(report, args.nodes, args.announced)
    report.note(
        f"Holder view: {args.paths:,} paths, each held by K of {args.holders:,} node "
        "identities, one record per holding; each view read by a fresh process (BusRouter, "
        "until caught up); memory is the resident set added by the view. The baseline replays "
        "one event per holding; a real old-format stream also holds every superseded "
        "announcement until it expires, so the old format's cost is at least that."
    )
    report.note(
        f"Traffic: every node registers, announces the same {args.announced} paths and gets one "
        "want; node-0's want consumer, holder view and one CSI wait are counted. The holder "
        "view is a full copy of the cluster's state, so what a node's view receives grows "
        "with the announcements of the whole cluster (N x A records); what its consumer and "
        "its CSI waits receive does not grow with N."
    )
    report.write(args.json)
    return 0 if report.all_met else 1


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--view-child":
        print(json.dumps(asyncio.run(view_child(sys.argv[2], sys.argv[3]))))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", type=int, default=10_000)
    parser.add_argument("--holders", type=int, default=1_000)
    parser.add_argument("--per-path", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--nodes", type=int, nargs="+", default=[2, 10, 100, 1000])
    parser.add_argument("--announced", type=int, default=10)
    add_json_option(parser)
    sys.exit(asyncio.run(main(parser.parse_args())))
