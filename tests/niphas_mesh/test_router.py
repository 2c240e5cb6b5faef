"""The router conformance suite: `BusRouter` (over a real nats-server) and its in-memory
twin `MemoryRouter` pass the same tests: an announcement reaches every router's index in one
order with its sequence, a router started later replays what came before, withdrawals remove
holders, and `fetching` announcements are ordered by sequence."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest

from niphas_common.bus.bus import Bus
from niphas_common.settings import NatsSettings
from niphas_mesh.router import BusRouter, MemoryRouter, MemoryStream, Router
from niphas_schemas import PathAvailable
from tests.helpers import eventually

PATH = "/nix/store/" + "a" * 32 + "-hello"
NewRouter = Callable[[], Awaitable[Router]]


@pytest.fixture(params=["memory", "bus"])
async def new_router(
    request: pytest.FixtureRequest, nats_settings: NatsSettings
) -> AsyncIterator[NewRouter]:
    started: list[Router] = []
    buses: list[Bus] = []
    stream = MemoryStream()

    async def make() -> Router:
        router: Router
        if request.param == "memory":
            router = MemoryRouter(stream)
        else:
            buses.append(await Bus.connect(nats_settings, name=f"router-test-{len(buses)}"))
            router = BusRouter(buses[-1])
        await router.start()
        started.append(router)
        return router

    yield make
    for router in started:
        await router.stop()
    for bus in buses:
        await bus.close()


def said(node: str, state: str, path: str = PATH) -> PathAvailable:
    held = {"nar_hash": "sha256:" + "0" * 52, "nar_size": 1} if state == "available" else {}
    return PathAvailable.model_validate(
        {
            "holder_kind": "node",
            "holder": node,
            "holder_url": f"http://{node}:5480",
            "state": state,
            "store_path": path,
            **held,
        }
    )


async def test_an_announcement_reaches_every_index_with_its_sequence(
    new_router: NewRouter,
) -> None:
    one, two = await new_router(), await new_router()
    seq = await one.announce(said("n1", "available"))
    for router in (one, two):
        assert await router.index.reached(seq, 5.0)
        assert [h.holder for h in router.index.available(PATH)] == ["n1"]
        assert router.index.held_by("http://n1:5480") == {PATH}


async def test_a_later_router_replays_the_stream_and_is_caught_up(new_router: NewRouter) -> None:
    first = await new_router()
    await first.announce(said("n1", "available"))
    seq = await first.announce(said("n2", "available"))
    late = await new_router()
    await eventually(lambda: late.caught_up)
    assert await late.index.reached(seq, 5.0)
    assert {h.holder for h in late.index.available(PATH)} == {"n1", "n2"}


async def test_a_withdrawal_removes_the_holder(new_router: NewRouter) -> None:
    router = await new_router()
    await router.announce(said("n1", "available"))
    seq = await router.announce(said("n1", "withdrawn"))
    assert await router.index.reached(seq, 5.0)
    assert router.index.available(PATH) == []
    assert router.index.announced_by("n1") == set()


async def test_fetching_announcements_are_ordered_by_sequence(new_router: NewRouter) -> None:
    router = await new_router()
    early = await router.announce(said("n1", "fetching"))
    late = await router.announce(said("n2", "fetching"))
    assert early < late
    assert await router.index.reached(late, 5.0)
    since = datetime.now(UTC) - timedelta(minutes=1)
    assert [h.holder for h in router.index.fetchers(PATH, since, before=late)] == ["n1"]
    assert router.index.fetchers(PATH, since, before=early) == []
