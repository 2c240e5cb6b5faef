"""End-to-end events/s through the spine vs raw nats-py, same server, same run.

Each side publishes N ~1 KB events and a durable pull consumer receives and acks every one;
the clock runs from the first publish to the last ack.
- raw: `js.publish_async` + `fetch(batch)` + `ack()` with no validation, tracing or headers;
- raw, the same work (the floor): raw nats-py doing what the spine cannot skip, each event
  encoded to the same JSON body and headers (Msg-Id, event id, traceparent) as it is sent,
  and per message one model decode and a read of its delivery count (handlers are given it);
- spine: `Publisher.publish_many` (Msg-Id, traceparent, PubAck awaited) and `Bus.serve`
  (pydantic decode, a consumer span, per-message ack). The spine pulls with its own requests
  (`bus/pull.py`) rather than nats-py's `fetch`, whose per-message cost the raw rows still
  pay: that is how it can run above the floor.
Beside events/s, each row gives this process's CPU time per event (publisher and consumer
both run here; the server's CPU is not counted): on a shared host it varies far less.
Targets: spine >= 5,000 events/s and >= 0.8x raw. The spine runs as deployed by default
(tracing off: trace ids propagated, spans not recorded); a third row records every span into
an exporter that drops them, to show what tracing costs.

Run: .venv/bin/python bench/bench_spine.py [--events N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import nats
from faststream import AckPolicy as FastStreamAck
from faststream.nats import JStream, NatsBroker, PullSub
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from niphas_common.bus.bus import Bus
from niphas_common.bus.codec import encode, headers_for
from niphas_common.bus.consumer import Delivery, Subscription
from niphas_common.bus.topology import ConsumerSpec
from niphas_common.nats_server import EmbeddedNats
from niphas_common.settings import NatsSettings
from niphas_common.tracing import setup_tracing
from niphas_schemas import PushReceived

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for bench.report
from bench.report import Report, add_json_option

PAYLOAD_BYTES = 1024


def make_events(n: int) -> list[PushReceived]:
    base = PushReceived(
        forge="github",
        repository="https://git.example.test/acme/app.git",
        ref="refs/heads/main",
        commit="0123456789abcdef0123456789abcdef01234567",
        delivery_id="x",
    )
    pad = PAYLOAD_BYTES - len(base.model_dump_json())
    repo = "https://git.example.test/" + "a" * max(pad, 0) + ".git"
    return [base.model_copy(update={"delivery_id": f"d-{i}", "repository": repo}) for i in range(n)]


async def raw_nats(url: str, n: int, *, same_work: bool = False) -> float:
    """Raw nats-py; with `same_work`, the work the spine cannot skip: the same JSON bodies
    and headers (Msg-Id, event id, traceparent) published, each body decoded to its model."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="RAW", subjects=["raw.bench"]))
    await js.add_consumer(
        "RAW", ConsumerConfig(durable_name="raw", ack_policy=AckPolicy.EXPLICIT, max_ack_pending=-1)
    )
    psub = await js.pull_subscribe_bind(durable="raw", stream="RAW")
    events = make_events(n)
    trace = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    payload = os.urandom(PAYLOAD_BYTES // 2).hex().encode()
    received = 0

    async def consume() -> None:
        nonlocal received
        while received < n:
            try:
                msgs = await psub.fetch(100, timeout=1)
            except nats.errors.TimeoutError:
                continue
            for msg in msgs:
                if same_work:
                    PushReceived.model_validate_json(msg.data)
                    msg.metadata.num_delivered  # noqa: B018 (read: every handler gets it)
                await msg.ack()
            received += len(msgs)

    start = time.perf_counter()
    consumer = asyncio.create_task(consume())
    futures = []
    for event in events:
        # Encoded as it is sent, as the spine does (a caller hands it events, not bytes).
        if same_work:
            body, headers = encode(event), {**headers_for(event), **trace}
        else:
            body, headers = payload, None
        futures.append(await js.publish_async("raw.bench", body, headers=headers))
        if len(futures) >= 256:
            await asyncio.gather(*futures)
            futures = []
    await asyncio.gather(*futures)
    await consumer
    elapsed = time.perf_counter() - start
    await nc.close()
    return n / elapsed


async def raw_same_work(url: str, n: int) -> float:
    return await raw_nats(url, n, same_work=True)


async def faststream_pull(url: str, n: int) -> float:
    """The same events through a faststream pull subscriber (validation, ack; no spans)."""
    bus = await Bus.connect(NatsSettings(url=url), name="bench")
    broker = NatsBroker(url, logger=None)
    done = asyncio.Event()
    received = 0

    @broker.subscriber(
        "push.received",
        stream=JStream("PUSH_RECEIVED", declare=False),
        durable="bench-faststream",
        pull_sub=PullSub(batch_size=100, timeout=1.0),
        ack_policy=FastStreamAck.ACK,
    )
    async def handle(event: PushReceived) -> None:
        nonlocal received
        received += 1
        if received == n:
            done.set()

    await broker.start()
    start = time.perf_counter()
    await bus.publisher.publish_many(make_events(n))
    await done.wait()
    elapsed = time.perf_counter() - start
    await broker.stop()
    await bus.close()
    return n / elapsed


async def spine(url: str, n: int) -> float:
    setup_tracing("bench")
    bus = await Bus.connect(NatsSettings(url=url), name="bench")
    events = make_events(n)
    done = asyncio.Event()
    received = 0

    async def handle(event: PushReceived, delivery: Delivery) -> None:
        nonlocal received
        received += 1
        if received == n:
            done.set()

    spec = ConsumerSpec(durable="bench", subject="push.received", max_ack_pending=-1)
    stop = asyncio.Event()
    start = time.perf_counter()
    serving = asyncio.create_task(
        bus.serve([Subscription(PushReceived, spec, handle, concurrency=256)], stop)
    )
    await bus.publisher.publish_many(events)
    await done.wait()
    elapsed = time.perf_counter() - start
    stop.set()
    await serving
    await bus.close()
    return n / elapsed


class _DiscardExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


Side = Callable[[str, int], Awaitable[float]]


async def fresh(measure: Side, n: int) -> tuple[float, float]:
    """One measurement on a new server, so no side inherits the other's stream: events/s,
    and this process's CPU microseconds per event (steadier than events/s on a busy host)."""
    with tempfile.TemporaryDirectory() as tmp, EmbeddedNats(Path(tmp)) as server:
        cpu = time.process_time()
        rate = await measure(server.url, n)
        return rate, (time.process_time() - cpu) / n * 1e6


def medians(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(r for r, _ in runs), statistics.median(c for _, c in runs)


async def main(n: int, rounds: int, json_path: Path | None) -> None:
    # Interleaved rounds, median of each: the sides see the same machine noise.
    sides: dict[str, Side] = {
        "raw": raw_nats, "same": raw_same_work, "ours": spine, "fast": faststream_pull,
    }  # fmt: skip
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in [*sides, "traced"]}
    for _ in range(rounds):
        for name, side in sides.items():
            runs[name].append(await fresh(side, n))
    setup_tracing("bench", _DiscardExporter())
    runs["traced"] = [await fresh(spine, n) for _ in range(rounds)]
    (raw, raw_cpu), (ours, ours_cpu) = medians(runs["raw"]), medians(runs["ours"])
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(f"{n} events of ~{PAYLOAD_BYTES} B, publish -> durable pull consumer -> ack")
    print(f"median of {rounds} interleaved rounds, each on a fresh nats-server")
    print("CPU: this process's (publisher and consumer) per event, the server's not counted\n")
    print(f"| {'measure':<28} | {'events/s':>9} | {'ratio':>6} | {'CPU us/ev':>9} | target |")
    print(f"|{'-' * 30}|{'-' * 11}|{'-' * 8}|{'-' * 11}|--------|")
    ok = "ok" if ours >= 5000 and ours / raw >= 0.8 else "MISSED"
    labels = {
        "raw": ("raw nats-py (baseline)", ""),
        "same": ("raw nats-py, the same work", "(floor)"),
        "ours": ("niphas spine", f">=5k, >=0.8x: {ok}"),
        "fast": ("faststream pull subscriber", ""),
        "traced": ("niphas spine, spans recorded", ""),
    }
    for name, (label, target) in labels.items():
        rate, cpu = medians(runs[name])
        print(f"| {label:<28} | {rate:>9,.0f} | {rate / raw:>6.2f} | {cpu:>9.1f} | {target} |")

    report = Report("spine", f"Event spine: {n} events of ~1 KB, publish -> pull consumer -> ack")
    base = {"baseline": raw, "baseline_name": "raw nats-py (publish_async + fetch + ack)"}
    report.row("spine events/s", ours, "events/s", **base, target=">= 5,000/s and >= 0.8x",
               met=ours >= 5000 and ours / raw >= 0.8)  # fmt: skip
    same, fast, traced = (medians(runs[k])[0] for k in ("same", "fast", "traced"))
    report.row("raw nats-py with the spine's unavoidable work (floor)", same, "events/s", **base)
    report.row("faststream pull subscriber events/s", fast, "events/s", **base)
    report.row("spine events/s, spans recorded", traced, "events/s", **base)
    report.note(f"median of {rounds} interleaved rounds, each on a fresh nats-server")
    report.note(
        f"client CPU per event: spine {ours_cpu:.1f} us, raw nats-py {raw_cpu:.1f} us "
        f"({raw_cpu / ours_cpu:.2f}x)"
    )
    report.write(json_path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    add_json_option(parser)
    args = parser.parse_args()
    asyncio.run(main(args.events, args.rounds, args.json))
