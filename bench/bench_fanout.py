"""Fan-out by simulation: one closure wanted by N nodes at once, with the mesh and without,
for N = 2, 4, 8, 16, 32 on loopback; then a model of 1,000 nodes fitted to the curve.

    .venv/bin/python bench/bench_fanout.py [--nodes 2,4,8,16,32] [--size-mb 32] [--json PATH]

Each node is a chroot store of its own. The cache is nginx serving a signed, uncompressed
`file://` cache (its access log counts the NAR bytes it sends). For every N, a fresh closure
(`--paths` store paths of random files, ~size-mb in all):
- with the mesh: one `niphas mesh` agent per node (started once, the first N take part) on a
  real nats-server; the cache is announced as a holder, each node gets a `path.wanted` at the
  same moment, and the clock stops when every node has announced every path;
- without: N `nix copy --from <nginx> --to <node store>` at once (the same concurrency), each
  node fetching everything from the cache.
Measured: the cache's egress (bytes of NARs nginx sent) and the completion time. Target: with
the mesh, the cache sends <= 2x the closure at every N. The machine's 2 cores are shared by
every node, so completion times here measure total work; the model (printed, and in the JSON
notes) says how that carries over to 1,000 nodes with a core and a link each.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

from niphas_common.bus.bus import Bus
from niphas_common.nats_server import EmbeddedNats
from niphas_common.nix.runner import NixRunner, PathInfo
from niphas_common.nix.signing import SecretKey
from niphas_common.nix.store_path import StorePath
from niphas_common.settings import NatsSettings
from niphas_schemas import PathAvailable, PathWanted

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for bench.*
from bench.http_servers import NGINX, Nginx
from bench.mesh_nodes import ROOT, Agents, add, make_paths
from bench.report import Report, Series, add_json_option
from tests.niphas_mesh.test_fetch import announce_cache
from tests.nix_harness import BuiltClosure

MODEL_NODES = 1000
LINK_BYTES_PER_S = 1.25e9
"""The model's per-node link (and the cache's uplink): 10 Gbit/s."""


async def with_mesh(
    nats_url: str,
    cache_url: str,
    infos: dict[str, PathInfo],
    nodes: list[str],
    agent_urls: dict[str, str],
    finished: list[float] | None = None,
) -> float:
    """Announce the cache as holder, want the closure on every node at once; seconds until
    every node announced every path. `finished` gets each node's own time (sorted)."""
    bus = await Bus.connect(NatsSettings(url=nats_url), name="bench-fanout")
    needed = {(agent_urls[n], p) for n in nodes for p in infos}
    arrived: set[tuple[str, str]] = set()
    left = {agent_urls[n]: len(infos) for n in nodes}
    ends: list[float] = []
    done = asyncio.Event()
    start = time.perf_counter()

    async def on_available(msg: object) -> None:
        event = PathAvailable.model_validate_json(msg.data)  # type: ignore[attr-defined]
        key = (event.holder_url, event.store_path)
        if event.state == "available" and key in needed and key not in arrived:
            arrived.add(key)
            left[event.holder_url] -= 1
            if not left[event.holder_url]:
                ends.append(time.perf_counter() - start)
            if needed <= arrived:
                done.set()

    sub = await bus.nc.subscribe(PathAvailable.subject, cb=on_available)
    try:
        first = next(iter(infos.values())).path
        await announce_cache(bus, cache_url, BuiltClosure(first, infos), name="nginx")
        deadline = datetime.now(UTC) + timedelta(minutes=15)
        wants = [
            PathWanted(node=n, store_paths=tuple(infos), deadline=deadline, requester="bench")
            for n in nodes
        ]
        start = time.perf_counter()
        await asyncio.gather(*(bus.publish(w) for w in wants))
        await asyncio.wait_for(done.wait(), 15 * 60)
        if finished is not None:
            finished[:] = sorted(ends)
        return time.perf_counter() - start
    finally:
        await sub.unsubscribe()
        await bus.close()


async def without_mesh(
    tmp: Path, cache_url: str, paths: list[StorePath], key: str, n: int
) -> float:
    """N `nix copy --from` the cache at once into fresh stores; seconds until all are done."""
    clients = [
        NixRunner(
            options={"trusted-public-keys": key},
            env={"XDG_CACHE_HOME": str(tmp / f"xdg-{i}")},  # no narinfo cache between runs
        )
        for i in range(n)
    ]
    start = time.perf_counter()
    await asyncio.gather(
        *(c.acopy(paths, src=cache_url, to=str(tmp / f"node-{i}")) for i, c in enumerate(clients))
    )
    return time.perf_counter() - start


def fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares y = a + b x: (a, b, residual sum of squares)."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    a = my - b * mx
    return a, b, sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True))


def trend(ns: list[int], ts: list[float]) -> tuple[str, float]:
    """The better of t = a + b N and t = a + b log2 N: (formula, value at MODEL_NODES)."""
    a1, b1, r1 = fit([float(n) for n in ns], ts)
    a2, b2, r2 = fit([math.log2(n) for n in ns], ts)
    if r1 <= r2:
        return f"{a1:.2f} + {b1:.3f} N s", a1 + b1 * MODEL_NODES
    return f"{a2:.2f} + {b2:.2f} log2(N) s", a2 + b2 * math.log2(MODEL_NODES)


def model(
    report: Report, ns: list[int], closure: int, largest_path: int, measured: dict[str, list[float]]
) -> None:
    """The 1,000-node model from the measured curves (rows and a note with its assumptions)."""
    mesh_egress = [e / closure for e in measured["mesh egress"]]
    plain_egress = [e / closure for e in measured["plain egress"]]
    # Egress with the mesh: the measured multiple of the closure, its worst over the range
    # (it does not grow with N: each path leaves the cache about once).
    egress_factor = max(mesh_egress)
    egress_slope = fit([float(n) for n in ns], mesh_egress)[1]
    mesh_trend, mesh_here = trend(ns, measured["mesh time"])
    plain_trend, plain_here = trend(ns, measured["plain time"])
    # A cluster: a link of LINK_BYTES_PER_S per node and for the cache. Without the mesh the
    # cache's uplink carries N closures; with it, holders of a path double every time one path
    # crosses a link (each wanting node picks a random holder), so log2(N) rounds of the
    # largest path after the cache's first copy of the closure.
    local = min(measured["plain time"][0], measured["mesh time"][0])
    plain_1000 = MODEL_NODES * closure / LINK_BYTES_PER_S + local
    mesh_1000 = (
        egress_factor * closure / LINK_BYTES_PER_S
        + math.ceil(math.log2(MODEL_NODES)) * largest_path / LINK_BYTES_PER_S
        + local
    )
    mb = closure / 1e6
    report.row(f"{MODEL_NODES} nodes: cache egress (model)", egress_factor * closure / 1e6, "MB",
               baseline=MODEL_NODES * closure / 1e6, baseline_name="every node from the cache",
               target="<= 2x the closure", met=egress_factor <= 2)  # fmt: skip
    report.row(f"{MODEL_NODES} nodes: completion time (model, 10 Gbit/s links)", mesh_1000, "s",
               baseline=plain_1000, baseline_name="every node from the cache")  # fmt: skip
    report.note(
        f"Model for {MODEL_NODES} nodes, fitted to the measured N = {ns}. "
        f"Cache egress with the mesh stayed at {min(mesh_egress):.2f}-{egress_factor:.2f}x the "
        f"{mb:.0f} MB closure (slope {egress_slope:+.4f}x per node: flat), without it "
        f"{plain_egress[0]:.1f}-{plain_egress[-1]:.1f}x (= N, the cache sends every node "
        f"everything). Assumed for {MODEL_NODES} nodes: egress {egress_factor:.2f}x the "
        f"closure ({egress_factor * mb:.0f} MB) with the mesh vs {MODEL_NODES}x "
        f"({MODEL_NODES * mb / 1e3:.0f} GB) without."
    )
    report.note(
        "Completion time on this host: all N nodes share its 2 cores, so the measured time is "
        f"total work (importing N copies), not a network: best fit with the mesh {mesh_trend}, "
        f"without {plain_trend}; extrapolated on one host to {MODEL_NODES} nodes: "
        f"{mesh_here:.0f} s vs {plain_here:.0f} s (what one machine simulating {MODEL_NODES} "
        "nodes would take, not a cluster)."
    )
    report.note(
        f"On a cluster each node has its own cores and a {LINK_BYTES_PER_S * 8 / 1e9:.0f} Gbit/s "
        "link, and so has the cache. Without the mesh the cache's uplink carries N closures: "
        f"t = N S / B + t_local. With the mesh the cache sends {egress_factor:.2f} S once, and "
        "since every node fetches each path from a random holder, the holders of a path at "
        "least double each time the path crosses a link: t = E S / B + ceil(log2 N) P / B + "
        f"t_local (S the closure, P its largest path = {largest_path / 1e6:.1f} MB, B the link, "
        f"t_local = {local:.2f} s the import measured at N = {ns[0]}). For N = {MODEL_NODES}: "
        f"{mesh_1000:.2f} s with the mesh vs {plain_1000:.1f} s without. Not modelled: NATS "
        "fan-in of the announcements (1,000 nodes x paths events) and peers' disks."
    )


Measured = dict[str, list[float]]
"""Per node count, in order: cache bytes sent and seconds, with the mesh and without."""


def prepare(
    host: NixRunner,
    tmp: Path,
    ns: list[int],
    args: argparse.Namespace,
    closures: list[list[StorePath]],
) -> list[dict[str, PathInfo]]:
    """One generated closure per node count (added to `closures` as it is made, for the
    cleanup), signed into a file cache under `tmp`; their path infos."""
    print(f"generating {len(ns)} closures of {args.size_mb} MB ({args.paths} paths)", flush=True)
    for n in ns:
        dirs = make_paths(tmp / "src", f"fan{n}", args.size_mb << 20, args.files, args.paths)
        closures.append(add(host, dirs))
    shutil.rmtree(tmp / "src")
    added = [path for closure in closures for path in closure]
    host.copy(added, to=f"file://{tmp / 'cache'}?compression=none&secret-key={tmp / 'sk'}")
    return [host.path_info(c) for c in closures]


def rounds(
    tmp: Path,
    ns: list[int],
    closures: list[list[StorePath]],
    infos: list[dict[str, PathInfo]],
    public: str,
) -> Measured:
    """One fan-out per node count with the mesh, then without; the table row as it goes."""
    measured: Measured = {k: [] for k in ("mesh egress", "plain egress", "mesh time", "plain time")}
    server = EmbeddedNats(tmp / "nats")
    nats_url = server.start()
    agents = Agents(tmp, nats_url, public)
    nginx = Nginx(tmp, tmp / "cache")
    try:
        names = [f"n{i:02}" for i in range(max(ns))]
        started = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(agents.start, names))
        print(f"{len(names)} agents ready in {time.perf_counter() - started:.0f} s\n")
        print(f"| {'nodes':>5} | {'egress mesh':>11} | {'egress without':>14} | "
              f"{'time mesh':>9} | {'time without':>12} |")  # fmt: skip
        print(f"|{'-' * 7}|{'-' * 13}|{'-' * 16}|{'-' * 11}|{'-' * 14}|")
        for n, closure, info in zip(ns, closures, infos, strict=True):
            size = sum(i.nar_size for i in info.values())
            before = nginx.nar_bytes()
            t_mesh = asyncio.run(with_mesh(nats_url, nginx.url, info, names[:n], agents.urls))
            mid = nginx.nar_bytes()
            plain = tmp / f"plain-{n}"
            t_plain = asyncio.run(without_mesh(plain, nginx.url, closure, public, n))
            shutil.rmtree(plain)
            e_mesh, e_plain = (mid - before) / size, (nginx.nar_bytes() - mid) / size
            for k, v in zip(measured, (mid - before, nginx.nar_bytes() - mid, t_mesh, t_plain),
                            strict=True):  # fmt: skip
                measured[k].append(v)
            print(f"| {n:>5} | {e_mesh:>10.2f}x | {e_plain:>13.2f}x | {t_mesh:>8.2f}s | "
                  f"{t_plain:>11.2f}s |", flush=True)  # fmt: skip
    finally:
        agents.stop()
        nginx.stop()
        server.stop()
    return measured


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="2,4,8,16,32", help="comma-separated node counts")
    parser.add_argument("--size-mb", type=int, default=32, help="closure size per round")
    parser.add_argument("--paths", type=int, default=8, help="store paths per closure")
    parser.add_argument("--files", type=int, default=200, help="files per closure")
    add_json_option(parser)
    args = parser.parse_args()
    ns = sorted(int(n) for n in args.nodes.split(","))
    if not Path(NGINX).exists():
        subprocess.run(["bash", str(ROOT / "scripts" / "setup-bench-tools.sh")], check=True)

    host = NixRunner()
    closures: list[list[StorePath]] = []
    with tempfile.TemporaryDirectory(prefix="bench-fanout-") as tmp_name:
        tmp = Path(tmp_name)
        key = SecretKey.generate("bench-1")
        (tmp / "sk").write_text(str(key))
        try:
            infos = prepare(host, tmp, ns, args, closures)
            measured = rounds(tmp, ns, closures, infos, str(key.public_key))
        finally:
            if added := [path for closure in closures for path in closure]:
                host.run("nix-store", "--delete", *map(str, added), check=False)
    report = fanout_report(args, ns, infos, measured)
    for note in report.notes[1:]:
        print(f"\n{note}")
    report.write(args.json)
    return 0 if report.all_met else 1


def fanout_report(
    args: argparse.Namespace, ns: list[int], infos: list[dict[str, PathInfo]], measured: Measured
) -> Report:
    closure_bytes = statistics.median(sum(i.nar_size for i in info.values()) for info in infos)
    largest = max(i.nar_size for info in infos for i in info.values())
    report = Report(
        "fanout", f"Fan-out of a {closure_bytes / 1e6:.0f} MB closure to N nodes at once"
    )
    for i, n in enumerate(ns):
        egress, alone = measured["mesh egress"][i], measured["plain egress"][i]
        report.row(f"cache egress, {n} nodes", egress / 1e6, "MB", baseline=alone / 1e6,
                   baseline_name="nix copy --from the cache on every node",
                   target="<= 2x the closure", met=egress <= 2 * closure_bytes)  # fmt: skip
    for i, n in enumerate(ns):
        report.row(f"completion time, {n} nodes", measured["mesh time"][i], "s",
                   baseline=measured["plain time"][i],
                   baseline_name="nix copy --from the cache on every node")  # fmt: skip
    xs = [float(n) for n in ns]
    for plot, unit, scale in (("cache egress", "MB", 1e-6), ("completion time", "s", 1.0)):
        kind = "egress" if plot == "cache egress" else "time"
        for mode, label in (("mesh", "with the mesh"), ("plain", "without (nix copy)")):
            ys = [v * scale for v in measured[f"{mode} {kind}"]]
            report.series.append(Series(plot, label, xs, ys, "nodes", f"{plot} ({unit})"))
    report.note(
        f"One round per N on loopback (2 shared cores), closure {closure_bytes / 1e6:.1f} MB in "
        f"{args.paths} paths; nginx serves the cache; the agents run with default settings. "
        f"All {max(ns)} agents run during every round (the idle ones follow the announcements "
        "too), so small N pay for the idle agents' share of the cores."
    )
    model(report, ns, int(closure_bytes), largest, measured)
    return report


if __name__ == "__main__":
    sys.exit(main())
