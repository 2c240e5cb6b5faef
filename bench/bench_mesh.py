"""Mesh benchmark: the agent as a binary cache vs nginx serving the same static cache, and the
cache's egress when many nodes want one closure at once. Everything in the same run:

    .venv/bin/python bench/bench_mesh.py [--size-mb 200] [--files 2500] [--repeat 5] [--json PATH]

1. `nix copy --from` of a ~size-mb, ~files-file closure (10 store paths, random contents)
   from a mesh agent (`niphas mesh` over a chroot store holding it) vs from nginx serving a
   `nix copy --to file://...?compression=none` cache of the same paths. Target <= 1.0x nginx.
   Then narinfo lookups of a 500-path closure (`nix path-info --store <url>`), same comparison.
   Both also against the floor of HTTP stacks (`serve_floor`): a bare server answering from a
   dict of the cache's narinfos and sending its NAR files, with the agent's stack (aiohttp,
   NARs by sendfile) and with granian (Rust, RSGI; NARs streamed through Python, as an agent
   on it would have to), so the rows tell the cost of our code (agent vs its stack's floor)
   from the cost of the stack (floor vs nginx); and each server's CPU time per path looked up
   and per MB copied, which the load of a shared machine disturbs far less than wall time.
2. Fan-out: 8 agents (chroot stores) want a new closure of size-mb/2 at once, with the cache
   (nginx) announced as a holder. Bytes nginx sent must stay <= 2x the closure (8x without the
   mesh) and all nodes must be done within 3x the time one node alone takes (a closure of the
   same size). It runs twice. First with one CPU share per node (`--node-cores`, a cgroup
   quota on each agent and the `nix` processes it starts, see cpu_shares.py), so one node alone
   has no more CPU than each of eight, as on separate machines: the target applies here. Then
   with all nodes sharing the host's cores, where eight imports cost eight times the CPU of
   one; the CPU time each node used is printed with the bound it sets on that ratio.

Node and client stores live on a fresh journaled ext4 (`scratch_fs.py`: the machine's own root
file system makes file creation erratic after mass deletions). Each timing is the median of
--repeat runs with a fresh client store and narinfo cache; the
agent's and nginx's runs alternate (the machine's cores are shared, so load hits both alike).
`--json PATH` writes the rows (measure, ours, baseline, ratio, target, met) for reports. nginx
comes from scripts/setup-bench-tools.sh (run when missing). Paths added to the host store are
deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from niphas_common.bus.bus import Bus
from niphas_common.nats_server import EmbeddedNats
from niphas_common.nix.runner import NixRunner
from niphas_common.nix.signing import SecretKey
from niphas_common.nix.store_path import StorePath
from niphas_common.settings import NatsSettings
from niphas_schemas import PathAvailable, PathWanted

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for bench.report
from bench.cpu_shares import CpuShares
from bench.http_servers import NGINX, Nginx, free_port, wait_http
from bench.mesh_nodes import ROOT, Agents, add, make_paths
from bench.report import Report, add_json_option
from bench.scratch_fs import journaled_ext4


def median_times(repeat: int, fns: list[Callable[[], None]]) -> list[float]:
    """The median time of each of `fns`, their runs interleaved (order alternating)."""
    return times_and_cpu(repeat, fns, [os.getpid()] * len(fns))[0]


def times_and_cpu(
    repeat: int, fns: list[Callable[[], None]], pids: list[int]
) -> tuple[list[float], list[float]]:
    """The median time of each of `fns`, their runs interleaved (order alternating), and the
    mean CPU time per run of the server process `pids[i]` serving `fns[i]` (its threads and
    live children: nginx's workers), which load on the shared machine disturbs far less."""
    times: list[list[float]] = [[] for _ in fns]
    cpu = [0.0 for _ in fns]
    for r in range(repeat):
        order = list(range(len(fns)))
        if r % 2:
            order.reverse()
        for i in order:
            cpu_before = tree_cpu_seconds(pids[i])
            start = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - start)
            cpu[i] += tree_cpu_seconds(pids[i]) - cpu_before
    return [statistics.median(t) for t in times], [c / repeat for c in cpu]


def tree_cpu_seconds(pid: int) -> float:
    """CPU time a process (all its threads) and its live descendants have used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            with contextlib.suppress(FileNotFoundError):  # it ended meanwhile
                total += tree_cpu_seconds(int(child))
    return total


def timed_row(
    report: Report, measure: str, ours: float, baseline: float, name: str, target: float
) -> None:
    """A time compared with a baseline's; met when ours <= target x baseline."""
    ratio = ours / baseline
    report.row(measure, round(ours, 4), "s", baseline=round(baseline, 4), baseline_name=name,
               ratio=round(ratio, 3), target=f"<= {target:g}x", met=ratio <= target)  # fmt: skip


def nix_copy(tmp: Path, url: str, paths: list[StorePath], key: str) -> Callable[[], None]:
    runs = iter(range(1000))

    def run() -> None:
        i = next(runs)
        dest = tmp / f"client-{url.rsplit(':', 1)[1]}-{i}"
        env = {"XDG_CACHE_HOME": str(tmp / f"xdg-{dest.name}")}
        client = NixRunner(options={"trusted-public-keys": key}, env=env)
        client.copy(paths, src=url, to=str(dest))
        shutil.rmtree(dest, ignore_errors=True)

    return run


def path_info(tmp: Path, url: str, paths: list[StorePath], key: str) -> Callable[[], None]:
    runs = iter(range(1000))

    def run() -> None:
        env = {"XDG_CACHE_HOME": str(tmp / f"xdg-pi-{url.rsplit(':', 1)[1]}-{next(runs)}")}
        client = NixRunner(store=url, options={"trusted-public-keys": key}, env=env)
        client.run("nix", "path-info", *map(str, paths))

    return run


async def fan_out(
    nats_url: str,
    cache_url: str,
    closures: dict[str, list[StorePath]],
    infos: dict[str, object],
    single: str,
    many: list[str],
    agent_urls: dict[str, str],
) -> tuple[float, float]:
    """Announce the cache as the holder of both closures, then time one node alone wanting
    `closures["single"]`, then all of `many` wanting `closures["fanout"]` at once."""
    bus = await Bus.connect(NatsSettings(url=nats_url), name="bench")
    have: set[tuple[str, str]] = set()

    async def on_msg(msg: object) -> None:
        data = json.loads(msg.data)  # type: ignore[attr-defined]
        if data["state"] == "available":
            have.add((data["holder_url"], data["store_path"]))

    sub = await bus.nc.subscribe(PathAvailable.subject, cb=on_msg)
    try:
        for info in infos.values():
            await bus.publish(
                PathAvailable(
                    holder_kind="cache", holder="nginx", holder_url=cache_url,
                    store_path=str(info.path), nar_hash=info.nar_hash.nix32,  # type: ignore[attr-defined]
                    nar_size=info.nar_size,  # type: ignore[attr-defined]
                )
            )  # fmt: skip

        async def want(nodes: list[str], closure: list[StorePath]) -> float:
            start = time.perf_counter()
            deadline = datetime.now(UTC) + timedelta(minutes=10)
            for node in nodes:
                await bus.publish(
                    PathWanted(node=node, store_paths=tuple(map(str, closure)),
                               deadline=deadline, requester="bench")
                )  # fmt: skip
            needed = {(agent_urls[n], str(p)) for n in nodes for p in closure}
            while not needed <= have:
                await asyncio.sleep(0.01)
            return time.perf_counter() - start

        t_single = await want([single], closures["single"])
        t_many = await want(many, closures["fanout"])
        return t_single, t_many
    finally:
        await sub.unsubscribe()
        await bus.close()


def fan_out_round(
    report: Report,
    host: NixRunner,
    nginx: Nginx,
    agents: Agents,
    nats_url: str,
    nodes: list[str],
    closures: dict[str, list[StorePath]],
    how: str,
    target: float | None,
) -> None:
    """One node alone, then all `nodes` at once; rows for the time ratio and the cache's
    egress, and the CPU time each node used."""
    infos = host.path_info(closures["single"] + closures["fanout"])
    before = nginx.nar_bytes()
    cpu_before = {n: agents.cpu_seconds(n) for n in nodes}
    t_single, t_many = asyncio.run(
        fan_out(nats_url, nginx.url, closures, dict(infos), nodes[0], nodes, agents.urls)
    )
    cpu = [agents.cpu_seconds(n) - cpu_before[n] for n in nodes]
    single_bytes = sum(i.nar_size for i in host.path_info(closures["single"]).values())
    closure_bytes = sum(i.nar_size for i in host.path_info(closures["fanout"]).values())
    egress = nginx.nar_bytes() - before - single_bytes
    # The node alone also did its fetch in this window: its CPU counts once more than others'.
    per_node = statistics.median(cpu[1:]) if len(cpu) > 1 else cpu[0]
    mb = closure_bytes >> 20
    print(f"fan-out, {how}: {len(nodes)} nodes of {mb} MB all done in {t_many:.2f}s vs "
          f"{t_single:.2f}s for one node ({t_many / t_single:.2f}x, target <= 3x); cache sent "
          f"{egress / closure_bytes:.2f}x the closure (target <= 2x, {len(nodes)}x without "
          f"the mesh); {per_node:.2f} CPU-s per node", flush=True)  # fmt: skip
    if target is not None:
        timed_row(report, f"fan-out: {len(nodes)} nodes want {mb} MB, {how}",
                  t_many, t_single, "one node alone", target)  # fmt: skip
    else:
        report.row(f"fan-out: {len(nodes)} nodes want {mb} MB, {how}", round(t_many, 4), "s",
                   baseline=round(t_single, 4), baseline_name="one node alone",
                   ratio=round(t_many / t_single, 3))  # fmt: skip
        cores = os.cpu_count() or 1
        report.note(
            f"fan-out {how}: each node used {per_node:.2f} CPU-s for {mb} MB, so {len(nodes)} "
            f"nodes need at least {len(nodes) * per_node / cores:.2f}s on {cores} cores, "
            f"{len(nodes) * per_node / cores / t_single:.1f}x the {t_single:.2f}s of one node "
            "that has the host to itself"
        )
    share = egress / closure_bytes
    report.row(f"fan-out, {how}: bytes the cache sent", round(share, 3), "x closure",
               target="<= 2x closure", met=share <= 2)  # fmt: skip


def generate(
    host: NixRunner, src: Path, args: argparse.Namespace, added: list[StorePath]
) -> tuple[list[StorePath], list[StorePath], dict[str, dict[str, list[StorePath]]]]:
    """The copied closure, the small paths of the narinfo lookups and each fan-out round's
    closures, added to the host store (and to `added`, for the cleanup)."""
    size = args.size_mb << 20
    print(f"generating: {args.size_mb} MB / {args.files} files, {args.narinfo_paths} "
          f"small paths, 4 x {args.size_mb // 2} MB for fan-out", flush=True)  # fmt: skip
    copy_paths = add(host, make_paths(src, "copy", size, args.files, 10))
    tiny = src / "tiny"
    tiny_dirs = []
    for i in range(args.narinfo_paths):
        (tiny / f"t{i:04}").mkdir(parents=True)
        (tiny / f"t{i:04}" / "x").write_text(f"{i}\n")
        tiny_dirs.append(tiny / f"t{i:04}")
    tiny_paths = add(host, tiny_dirs)
    rounds = {
        how: {
            kind: add(host, make_paths(src, f"{kind}-{how}", size // 2, args.files // 2, 10))
            for kind in ("single", "fanout")
        }
        for how in ("share", "shared")
    }
    added += copy_paths + tiny_paths
    added += [p for closures in rounds.values() for paths in closures.values() for p in paths]
    shutil.rmtree(src)
    return copy_paths, tiny_paths, rounds


CHUNK = 4 << 20
"""Bytes per read of a NAR streamed through Python (the agent's `serve_nar.CHUNK`)."""
FLOORS = ("aiohttp", "granian")
"""The HTTP stacks whose floor is measured: the agent's own and a server written in Rust that
calls Python handlers (RSGI), the fastest maintained one measured on PyPI."""


def serve_floor(stack: str, cache: Path, port: int) -> None:
    """The floor of an HTTP stack: a bare server answering every narinfo from a dict and every
    NAR with a static file (sendfile for aiohttp), no store, no verification; what the stack
    alone costs against nginx, in the same run."""
    infos = {p.name[:32]: p.read_bytes() for p in cache.glob("*.narinfo")}
    cache_info = (cache / "nix-cache-info").read_bytes()
    if stack == "granian":
        _serve_granian_floor(infos, cache_info, cache, port)
        return
    from aiohttp import web

    async def narinfo(request: web.Request) -> web.Response:
        body = infos.get(request.match_info["hash"])
        if body is None:
            raise web.HTTPNotFound()
        return web.Response(body=body, content_type="text/x-nix-narinfo")

    async def info(_: web.Request) -> web.Response:
        return web.Response(body=cache_info, content_type="text/x-nix-cache-info")

    async def nar(request: web.Request) -> web.FileResponse:
        return web.FileResponse(cache / "nar" / request.match_info["name"])

    app = web.Application()
    app.router.add_get("/nix-cache-info", info)
    app.router.add_get("/{hash:[0-9a-z]{32}}.narinfo", narinfo)
    app.router.add_get("/nar/{name}", nar)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def _serve_granian_floor(
    infos: dict[str, bytes], cache_info: bytes, cache: Path, port: int
) -> None:
    """granian's floor. Its NARs are streamed through Python in CHUNK-byte reads, as an agent on
    granian would have to: the agent serialises NARs from the store tree, and RSGI has no way
    to hand a file's bytes to sendfile after framing of its own (aiohttp's floor and the agent
    use sendfile)."""
    from granian._granian import RSGIHTTPProtocol as HTTPProtocol
    from granian.constants import Interfaces
    from granian.rsgi import Scope
    from granian.server.embed import Server

    async def app(scope: Scope, proto: HTTPProtocol) -> None:
        path = scope.path
        if path.endswith(".narinfo") and (body := infos.get(path[1:33])) is not None:
            proto.response_bytes(200, [("content-type", "text/x-nix-narinfo")], body)
        elif path == "/nix-cache-info":
            proto.response_bytes(200, [("content-type", "text/x-nix-cache-info")], cache_info)
        elif path.startswith("/nar/") and (nar := cache / path[1:]).is_file():
            size = str(nar.stat().st_size)
            headers = [("content-type", "application/x-nix-nar"), ("content-length", size)]
            stream = proto.response_stream(200, headers)
            with nar.open("rb") as f:
                while chunk := await asyncio.to_thread(f.read, CHUNK):
                    await stream.send_bytes(chunk)
        else:
            proto.response_bytes(404, [], b"not found\n")

    server = Server(app, address="127.0.0.1", port=port, interface=Interfaces.RSGI,
                    log_enabled=False)  # fmt: skip
    asyncio.run(server.serve())


@contextlib.contextmanager
def floor_server(stack: str, cache: Path) -> Iterator[tuple[str, int]]:
    """`serve_floor` in a process of its own; its URL and process id."""
    port = free_port()
    argv = [sys.executable, __file__, "--serve-floor", stack, str(cache), str(port)]
    proc = subprocess.Popen(argv)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/nix-cache-info")
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


def floor_rows(report: Report, measure: str, times: list[float]) -> None:
    """Rows of a measure taken of the agent, nginx and each of FLOORS (in that order): the agent
    against nginx (the target), each floor against nginx, and the agent against its own stack's
    floor (where the gap lies: in our code or in the HTTP stack)."""
    t_agent, t_nginx, *t_floors = times
    floors = dict(zip(FLOORS, t_floors, strict=True))
    shown = ", ".join(f"bare {k} {t:.3f}s ({t / t_nginx:.2f}x)" for k, t in floors.items())
    print(f"{measure}: agent {t_agent:.3f}s, nginx {t_nginx:.3f}s, agent/nginx "
          f"{t_agent / t_nginx:.2f}x (target <= 1.0x); {shown}; agent/bare aiohttp "
          f"{t_agent / floors['aiohttp']:.2f}x", flush=True)  # fmt: skip
    timed_row(report, measure, t_agent, t_nginx, "nginx", 1.0)
    for stack, t in floors.items():
        report.row(f"{measure}: floor of {stack} (bare server)", round(t, 4), "s",
                   baseline=round(t_nginx, 4), baseline_name="nginx",
                   ratio=round(t / t_nginx, 3))  # fmt: skip
    report.row(f"{measure}: agent vs its stack's floor", round(t_agent, 4), "s",
               baseline=round(t_floor := floors["aiohttp"], 4), baseline_name="bare aiohttp",
               ratio=round(t_agent / t_floor, 3))  # fmt: skip


def cpu_rows(report: Report, measure: str, cpu: list[float], per: int, unit: str) -> None:
    """Rows of the servers' CPU time per `unit` (agent, nginx, FLOORS in that order), each
    against nginx's."""
    names = ["agent", "nginx", *(f"bare {f}" for f in FLOORS)]
    each = [c / per * 1e6 for c in cpu]
    shown = ", ".join(f"{n} {c:.0f}" for n, c in zip(names, each, strict=True))
    print(f"{measure}: server CPU-us per {unit}: {shown}", flush=True)
    for name, c in zip(names, each, strict=True):
        if name != "nginx":
            report.row(f"{measure}: {name} CPU per {unit}", round(c, 1), "CPU-us",
                       baseline=round(each[1], 1), baseline_name="nginx",
                       ratio=round(c / each[1], 3) if each[1] else None)  # fmt: skip


def copy_rounds(
    report: Report,
    args: argparse.Namespace,
    work: Path,
    servers: list[tuple[str, int]],
    paths: tuple[list[StorePath], list[StorePath]],
    public: str,
) -> None:
    """Part 1: `nix copy --from` and narinfo lookups; the agent, nginx and the FLOORS
    (`servers`: URL and process id, in that order), their runs interleaved."""
    copy_paths, tiny_paths = paths
    urls, pids = [u for u, _ in servers], [p for _, p in servers]
    fns = [nix_copy(work, u, copy_paths, public) for u in urls]
    times, cpu = times_and_cpu(args.repeat, fns, pids)
    measure = f"nix copy --from, {args.size_mb} MB / {args.files} files"
    floor_rows(report, measure, times)
    cpu_rows(report, measure, cpu, args.size_mb, "MB")
    fns = [path_info(work, u, tiny_paths, public) for u in urls]
    times, cpu = times_and_cpu(args.repeat, fns, pids)
    measure = f"narinfo lookups, {len(tiny_paths)} paths (nix path-info)"
    floor_rows(report, measure, times)
    cpu_rows(report, measure, cpu, len(tiny_paths), "path")


def fan_out_rounds(
    report: Report,
    args: argparse.Namespace,
    host: NixRunner,
    servers: tuple[Nginx, Agents, str, CpuShares | None],
    rounds: dict[str, dict[str, list[StorePath]]],
) -> None:
    """Part 2: with one CPU share per node (when cgroups allow), then sharing the cores."""
    nginx, agents, nats_url, shares = servers
    nodes = [f"n{i}" for i in range(1, args.nodes + 1)]
    for node in nodes:
        agents.start(node)
    if shares is not None:
        shares.limit(args.node_cores)
        fan_out_round(report, host, nginx, agents, nats_url, nodes, rounds["share"],
                      f"one {args.node_cores:g}-core share per node", 3.0)  # fmt: skip
        shares.limit(None)
    else:
        report.note("no writable cgroup cpu controller: nodes share the host's cores")
    fan_out_round(report, host, nginx, agents, nats_url, nodes, rounds["shared"],
                  f"sharing {os.cpu_count()} cores",
                  3.0 if shares is None else None)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--files", type=int, default=2500)
    parser.add_argument("--narinfo-paths", type=int, default=500)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--node-cores", type=float, default=0.2,
                        help="CPU share of each node in the first fan-out round")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=5)
    add_json_option(parser)
    parser.add_argument("--skip-copy", action="store_true", help="only the fan-out part")
    parser.add_argument("--skip-fan-out", action="store_true", help="only the copy part")
    parser.add_argument("--serve-floor", nargs=3, metavar=("STACK", "CACHE", "PORT"),
                        help="(internal) the aiohttp floor server of a cache dir")  # fmt: skip
    args = parser.parse_args()
    if args.serve_floor:
        stack_name, cache_dir, port = args.serve_floor
        serve_floor(stack_name, Path(cache_dir), int(port))
        return 0
    report = Report("mesh", "mesh agent as a binary cache vs nginx; fan-out to many nodes")
    if not (os.path.exists(NGINX) and shutil.which("mkfs.ext4")):
        subprocess.run(["bash", str(ROOT / "scripts" / "setup-bench-tools.sh")], check=True)

    host = NixRunner()
    added: list[StorePath] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-mesh-")))
        key = SecretKey.generate("bench-1")
        (tmp / "sk").write_text(str(key))
        public = str(key.public_key)
        try:
            copy_paths, tiny_paths, rounds = generate(host, tmp / "src", args, added)
            cache = tmp / "cache"
            host.copy(added, to=f"file://{cache}?compression=none&secret-key={tmp / 'sk'}")
            scratch = stack.enter_context(journaled_ext4(tmp / "fs", 8))
            work = scratch[0]
            report.note(scratch[1])
            node0 = str(work / "nodes" / "n0")
            seed = NixRunner(store=node0, options={"trusted-public-keys": public})
            seed.copy(copy_paths + tiny_paths, src=f"file://{cache}", to=node0)
            # Setup wrote ~1 GB (random files, the store, the cache): flush it now, so its
            # writeback does not land on the clock of whichever side happens to run first.
            os.sync()
            server = EmbeddedNats(tmp / "nats")
            nats_url = server.start()
            shares = CpuShares.create("niphas-bench-mesh")
            agents = Agents(work, nats_url, public, shares)
            nginx = Nginx(tmp, cache)
            try:
                if not args.skip_copy:
                    floors = [stack.enter_context(floor_server(f, cache)) for f in FLOORS]
                    agent = (agents.start("n0"), agents.procs["n0"].pid)
                    served = [agent, (nginx.url, nginx.proc.pid), *floors]
                    copy_rounds(report, args, work, served, (copy_paths, tiny_paths), public)
                if not args.skip_fan_out:
                    servers = (nginx, agents, nats_url, shares)
                    fan_out_rounds(report, args, host, servers, rounds)
            finally:
                agents.stop()
                nginx.stop()
                server.stop()
                if shares is not None:
                    shares.remove()
        finally:
            if added:
                host.run("nix-store", "--delete", *map(str, added), check=False)
    report.note(f"medians of {args.repeat} interleaved runs (agent, nginx); 2 shared cores")
    report.note(f"fan-out without the mesh: the cache sends {args.nodes}x the closure")
    report.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
