"""The router conformance suite: `BusRouter` (over a real nats-server) and its in-memory
twin `MemoryRouter` pass the same tests: an announcement reaches every router's index in one
order with its revision, a router started later reads the state whole, withdrawals remove
holders, `fetching` announcements are ordered by revision, and a node's holdings are offered
only at the URL it registered (none once it left)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest

from niphas_common.bus.bus import Bus
from niphas_common.settings import NatsSettings
from niphas_mesh.router import BusRouter, MemoryRouter, MemoryState, Router
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
    state = MemoryState()

    async def make() -> Router:
        router: Router
        if request.param == "memory":
            router = MemoryRouter(state)
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


async def tell(router: Router, event: PathAvailable) -> int:
    """`event`, from a node registered at its URL (as its agent does at start)."""
    await router.register(event.holder, event.holder_url)
    return await router.announce(event)


async def test_an_announcement_reaches_every_index_with_its_sequence(
    new_router: NewRouter,
) -> None:
    one, two = await new_router(), await new_router()
    seq = await tell(one, said("n1", "available"))
    for router in (one, two):
        assert await router.index.reached(seq, 5.0)
        assert [h.holder for h in router.index.available(PATH)] == ["n1"]
        assert router.index.held_by("http://n1:5480") == {PATH}


async def test_a_later_router_replays_the_stream_and_is_caught_up(new_router: NewRouter) -> None:
    first = await new_router()
    await tell(first, said("n1", "available"))
    seq = await tell(first, said("n2", "available"))
    late = await new_router()
    await eventually(lambda: late.caught_up)
    assert await late.index.reached(seq, 5.0)
    assert {h.holder for h in late.index.available(PATH)} == {"n1", "n2"}


async def test_a_withdrawal_removes_the_holder(new_router: NewRouter) -> None:
    router = await new_router()
    await tell(router, said("n1", "available"))
    seq = await router.announce(said("n1", "withdrawn"))
    assert await router.index.reached(seq, 5.0)
    assert router.index.available(PATH) == []
    assert router.index.announced_by("n1") == set()


async def test_fetching_announcements_are_ordered_by_sequence(new_router: NewRouter) -> None:
    router = await new_router()
    early = await tell(router, said("n1", "fetching"))
    late = await tell(router, said("n2", "fetching"))
    assert early < late
    assert await router.index.reached(late, 5.0)
    since = datetime.now(UTC) - timedelta(minutes=1)
    assert [h.holder for h in router.index.fetchers(PATH, since, before=late)] == ["n1"]
    assert router.index.fetchers(PATH, since, before=early) == []


async def test_a_node_is_offered_only_at_the_url_it_registered(new_router: NewRouter) -> None:
    router, other = await new_router(), await new_router()
    seq = await router.announce(said("n1", "available"))
    assert await other.index.reached(seq, 5.0)
    assert other.index.available(PATH) == []  # n1 never said where it serves
    seq = await router.register("n1", "http://elsewhere:5480")
    assert await other.index.reached(seq, 5.0)
    assert other.index.available(PATH) == []  # the record names another address
    seq = await router.register("n1", "http://n1:5480")
    assert await other.index.reached(seq, 5.0)
    assert [h.holder for h in other.index.available(PATH)] == ["n1"]
    await router.leave("n1")
    seq = await router.announce(said("n2", "withdrawn"))  # any later write: the leave is read
    assert await other.index.reached(seq, 5.0)
    assert other.index.available(PATH) == []  # it left: not offered, though recorded
    assert other.index.announced_by("n1") == {PATH}
