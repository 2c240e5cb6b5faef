"""Mesh logic without a NATS server or a Nix store: holder choice (`HolderChoice`: peers, a
want's own cache, fallback caches) over an index fed by the in-memory router, and garbage
collection (`Collector`) over an in-memory catalogue, withdrawing through the in-memory router.
The same logic runs against real servers and stores in the other mesh tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from niphas_common.nix.hashes import Hash
from niphas_common.nix.runner import PathInfo
from niphas_common.nix.signing import TrustedKeys
from niphas_common.nix.store_path import StorePath
from niphas_mesh.announcer import Announcer
from niphas_mesh.gc import Collector
from niphas_mesh.holders import HolderChoice
from niphas_mesh.index import HolderIndex
from niphas_mesh.last_use import LastUse
from niphas_mesh.router import MemoryRouter, MemoryState
from niphas_mesh.store import NodeStore
from niphas_schemas import NodeRecord, PathAvailable

PATH = "/nix/store/" + "a" * 32 + "-app"
NAR_HASH = "sha256:" + "0" * 52


def said(node: str, state: str, size: int = 100) -> PathAvailable:
    """`node`'s announcement about PATH (an available one with a NAR hash and size)."""
    held = {"nar_hash": NAR_HASH, "nar_size": size} if state == "available" else {}
    return PathAvailable.model_validate(
        {"holder_kind": "node", "holder": node, "holder_url": f"http://{node}", "state": state,
         "store_path": PATH, **held}
    )  # fmt: skip


async def tell(router: MemoryRouter, event: PathAvailable) -> int:
    """`event`, from a node registered at its URL (as its agent does at start)."""
    await router.register(event.holder, event.holder_url)
    return await router.announce(event)


def available(node: str, size: int = 100) -> PathAvailable:
    return said(node, "available", size)


def fetching(node: str) -> PathAvailable:
    return said(node, "fetching")


async def choice_for(
    router: MemoryRouter, me: str = "me", **options: object
) -> tuple[HolderChoice, list[int]]:
    announced: list[int] = []

    async def announce_fetching() -> int:
        announced.append(await tell(router, fetching(me)))
        return announced[-1]

    choice = HolderChoice(
        router.index,
        PATH,
        node=me,
        url=f"http://{me}",
        announce_fetching=announce_fetching,
        **options,  # type: ignore[arg-type]
    )
    return choice, announced


@pytest.fixture
async def router() -> MemoryRouter:
    router = MemoryRouter(MemoryState())
    await router.start()
    return router


async def test_peers_before_caches_never_this_node(router: MemoryRouter) -> None:
    await tell(router, available("me"))
    await tell(router, available("peer"))
    choice, announced = await choice_for(router, fallback_caches=["http://cache"])
    assert [h.holder for h in await choice.next()] == ["peer"]
    assert announced == []  # a peer holds it: no `fetching` word needed
    assert [h.url for h in await choice.next()] == ["http://cache"]
    assert await choice.next() == []


async def test_a_wants_own_cache_comes_after_peers_and_before_fallback_caches(
    router: MemoryRouter,
) -> None:
    await tell(router, available("peer"))
    own: list[str] = []
    choice, _ = await choice_for(router, workload_caches=own, fallback_caches=["http://cache"])
    own.append("http://own")  # a want joining the flight adds its cache while it runs
    assert [h.holder for h in await choice.next()] == ["peer"]
    assert [h.url for h in await choice.next()] == ["http://own"]
    assert [h.url for h in await choice.next()] == ["http://cache"]
    assert await choice.next() == []


async def test_a_large_nar_comes_in_ranges_from_several_peers(router: MemoryRouter) -> None:
    for peer in ("p1", "p2", "p3"):
        await tell(router, available(peer, size=1 << 30))
    choice, _ = await choice_for(router, range_min_bytes=1 << 20)
    assert {h.holder for h in await choice.next()} == {"p1", "p2", "p3"}


async def test_an_earlier_fetcher_is_followed_a_later_one_never(router: MemoryRouter) -> None:
    await tell(router, fetching("early"))
    choice, announced = await choice_for(router, fallback_caches=["http://cache"])
    assert [h.holder for h in await choice.next()] == ["early"]
    assert len(announced) == 1
    # The node that announced after this one is not waited for: only the cache is left
    # once the earlier fetcher was tried (and the peer wait is over).
    await tell(router, fetching("late"))
    quick, _ = await choice_for(router, me="other", peer_wait_s=0.0, fallback_caches=["http://c"])
    assert [h.url for h in await quick.next()] == ["http://c"]


async def test_fetchers_of_one_path_follow_each_other_in_a_tree(router: MemoryRouter) -> None:
    """In announcement order node k streams first from node (k - 1) // 2: each node passes
    a path on to two followers first, not everyone to the first few announcers."""
    firsts = []
    for k in range(1, 8):
        await tell(router, fetching(f"n{k - 1}"))  # n0 .. n(k-1) announced before this one
        choice, _ = await choice_for(router, me=f"n{k}")
        firsts.append((await choice.next())[0].holder)
        await tell(router, said(f"n{k}", "withdrawn"))  # (this node's word taken back)
    assert firsts == ["n0", "n0", "n1", "n1", "n2", "n2", "n3"]


async def test_a_fetching_peer_that_had_nothing_yet_is_asked_again(router: MemoryRouter) -> None:
    await tell(router, fetching("early"))
    choice, _ = await choice_for(router)
    first = await choice.next()
    choice.again(first[0])
    assert await choice.next() == first


class CatalogueStore(NodeStore):
    """A NodeStore whose catalogue, disk usage and deletions live in memory."""

    def __init__(self, infos: list[PathInfo], per_path_percent: float) -> None:
        super().__init__("", TrustedKeys([]))
        self._paths.update({i.path.hash_part: i for i in infos})
        self.per_path = per_path_percent

    async def scan(self) -> object:  # type: ignore[override]
        return None

    async def delete(self, path: StorePath) -> bool:
        return self._paths.pop(path.hash_part, None) is not None

    def usage_percent(self) -> float:
        return self.per_path * len(self._paths)

    def is_signed(self, info: PathInfo) -> bool:
        return True


def info(name: str, *refs: PathInfo) -> PathInfo:
    path = StorePath({"lib": "1", "app": "2", "old": "3", "kept": "4"}[name] * 32, name)
    return PathInfo(path, Hash.parse(NAR_HASH), 100, tuple(r.path for r in refs))


async def test_gc_deletes_least_recently_used_leaves_keeps_and_withdraws(
    router: MemoryRouter, tmp_path: Path
) -> None:
    lib = info("lib")
    app = info("app", lib)
    old, kept = info("old"), info("kept")
    store = CatalogueStore([lib, app, old, kept], per_path_percent=20.0)  # 80% used
    last_use = LastUse(tmp_path / "last-use.json")
    for n, i in enumerate((old, app, lib, kept)):
        last_use.touch(i.path.hash_part, when=float(n))
    announcer = Announcer(router, "n1", "http://n1")
    for i in (lib, app, old, kept):
        await announcer.available(i)
    collector = Collector(
        store,
        last_use,
        lambda i: announcer.withdrawn(str(i.path)),
        node="n1",
        high_percent=70.0,
        low_percent=30.0,
    )
    deleted = await collector.collect(keep={kept.path.hash_part})
    # Oldest leaf first; `lib` only once `app`, which referenced it, was gone.
    assert [d.path.name for d in deleted] == ["old", "app", "lib"]
    assert router.index.held_by("http://n1") == {str(kept.path)}


async def test_a_node_is_offered_only_while_its_record_is_fresh_and_serving() -> None:
    index = HolderIndex(node_ttl_s=90.0)
    router = MemoryRouter(MemoryState(), index)
    await router.start()
    await router.announce(available("quiet"))
    await router.announce(available("stopped"))
    await router.announce(available("live"))
    now = datetime.now(UTC)
    quiet = NodeRecord(node="quiet", url="http://quiet", at=now - timedelta(minutes=5))
    index.set_node("quiet", quiet)
    index.set_node("stopped", NodeRecord(node="stopped", url="http://stopped", serving=False))
    await router.register("live", "http://live")
    assert [h.holder for h in index.available(PATH)] == ["live"]
    assert index.live_nodes(now) == ["live"]


async def test_records_of_nodes_gone_long_enough_are_named_for_deletion() -> None:
    index = HolderIndex(node_ttl_s=90.0)
    now = datetime.now(UTC)
    old = now - timedelta(hours=2)
    index.apply(available("ghost").model_copy(update={"occurred_at": old}), 1)  # never said
    index.apply(available("left").model_copy(update={"occurred_at": old}), 2)
    index.set_node("left", NodeRecord(node="left", url="http://left", serving=False, at=old), 3)
    index.apply(available("just-left"), 4)
    just_left = NodeRecord(node="just-left", url="http://just-left", serving=False)
    index.set_node("just-left", just_left, 5)
    index.apply(available("live").model_copy(update={"occurred_at": old}), 6)
    index.set_node("live", NodeRecord(node="live", url="http://live"), 7)
    gone = index.departed(now, after_s=3600.0)
    assert gone == {"ghost": ["a" * 32 + ".node.ghost"], "left": ["a" * 32 + ".node.left"]}
