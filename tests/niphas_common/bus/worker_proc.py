"""A consumer process for tests that kill or stop one: `python worker_proc.py MODE MARKER`.

MODE `hang`: write the event id and delivery count to MARKER, then never finish (the test
SIGKILLs us). MODE `slow`: write `started`, take two seconds, then append `done <event id>`
(the test sends SIGTERM in between: a graceful drain must still finish and ack).
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from niphas_common.bus.bus import Bus
from niphas_common.bus.consumer import Delivery, Subscription
from niphas_common.bus.topology import ConsumerSpec
from niphas_common.service import run_until_signalled
from niphas_common.settings import NatsSettings
from niphas_common.tracing import setup_tracing
from niphas_schemas import PushReceived

DURABLE = "test-worker"
ACK_WAIT_S = float(os.environ.get("TEST_ACK_WAIT_S", "2"))


def spec() -> ConsumerSpec:
    return ConsumerSpec(durable=DURABLE, subject="push.received", ack_wait_s=ACK_WAIT_S)


async def main(mode: str, marker: Path, stop: asyncio.Event) -> None:
    setup_tracing("test-worker")
    bus = await Bus.connect(NatsSettings(), name="test-worker")

    async def handle(event: PushReceived, delivery: Delivery) -> None:
        if mode == "hang":
            marker.write_text(f"{event.event_id} {delivery.num_delivered}\n")
            await asyncio.Event().wait()
        marker.write_text("started\n")
        await asyncio.sleep(2.0)
        with marker.open("a") as out:
            out.write(f"done {event.event_id}\n")

    subscription = Subscription(PushReceived, spec(), handle, concurrency=4)
    try:
        await bus.serve([subscription], stop, fetch_timeout_s=0.2)
    finally:
        await bus.close()


if __name__ == "__main__":
    mode, marker = sys.argv[1], Path(sys.argv[2])
    asyncio.run(run_until_signalled(lambda stop: main(mode, marker, stop)))
