"""Helpers for the spine tests: run consumers in-process and wait for conditions."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest

from niphas_common.bus.bus import Bus
from niphas_common.bus.consumer import Subscription
from niphas_schemas import PushReceived


async def eventually(check: Callable[[], bool], timeout_s: float = 15.0) -> None:
    """Wait until `check()` holds (a readiness wait, not a speed assertion)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def serving(bus: Bus, subscriptions: Sequence[Subscription[Any]]) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(bus.serve(subscriptions, stop, fetch_timeout_s=0.1))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


@pytest.fixture
def push_event() -> Callable[..., PushReceived]:
    def make(delivery_id: str = "delivery-1", **fields: Any) -> PushReceived:
        return PushReceived(
            forge="github",
            repository="https://git.example.test/acme/app.git",
            ref="refs/heads/main",
            commit="0123456789abcdef0123456789abcdef01234567",
            delivery_id=delivery_id,
            **fields,
        )

    return make
