"""The work queue: deduplication, one worker per key, dirty re-queue, per-key backoff."""

from __future__ import annotations

import asyncio

from niphas_operator.workqueue import WorkQueue


async def test_adding_a_waiting_key_twice_queues_it_once() -> None:
    queue: WorkQueue[str] = WorkQueue(retry_base_s=0.01, retry_max_s=0.1)
    queue.add("a")
    queue.add("a")
    queue.add("b")
    assert len(queue) == 2
    assert await queue.get() == "a"
    assert await queue.get() == "b"


async def test_a_key_changed_while_processing_is_processed_again_after() -> None:
    queue: WorkQueue[str] = WorkQueue(retry_base_s=0.01, retry_max_s=0.1)
    queue.add("a")
    key = await queue.get()
    queue.add("a")  # changed while a worker holds it: must not go to a second worker now
    assert len(queue._waiting) == 0
    queue.done(key)
    assert await asyncio.wait_for(queue.get(), 1) == "a"


async def test_retry_backs_off_exponentially_and_forget_resets() -> None:
    queue: WorkQueue[str] = WorkQueue(retry_base_s=0.01, retry_max_s=0.04)
    delays = [queue.retry("a") for _ in range(4)]
    assert delays == [0.01, 0.02, 0.04, 0.04]
    queue.forget("a")
    assert queue.retry("b") == 0.01
    assert await asyncio.wait_for(queue.get(), 1) in ("a", "b")
    queue.close()
    # A retry can start from its own first delay (a lost write race: read again at once).
    quick: WorkQueue[str] = WorkQueue(retry_base_s=0.5, retry_max_s=60)
    assert [quick.retry("c", 0.001) for _ in range(3)] == [0.001, 0.002, 0.004]
    assert await asyncio.wait_for(quick.get(), 5) == "c"
    quick.close()
