"""Fan-out under a network model of a cluster: one closure wanted by N nodes, each in its own
network namespace behind a rate-limited link, with the mesh and with stock `nix copy`.

    .venv/bin/python bench/bench_netmodel.py [--nodes 2,4,8,16,32] [--rate-mbit 128]
        [--size-mb 32] [--node-cores C] [--json PATH]

The network (bench/netns.py): a hub namespace with a bridge; every node and the binary cache
in a namespace of its own, linked to the bridge by a veth whose two ends are limited to
`--rate-mbit` by a token bucket (upload and download alike), no route anywhere else. nginx
serves the signed cache in the cache's namespace; nats-server runs on the hub's bridge address.
Each node's `niphas mesh` agent runs in its namespace (`ip netns exec`), listening on the
node's address, in a CPU share of its own (bench/cpu_shares.py, `--node-cores` each, so one
node alone gets no more CPU than each of many).

For N = 1 (the baseline) and every `--nodes` count, a fresh closure (~`--size-mb` in
`--paths` store paths), wanted at once:
- with the mesh: the cache is announced as holder and every node gets a `path.wanted` at the
  same moment; the clock stops when every node has announced every path;
- without: every node runs `nix copy --from http://<cache>` into a store of its own, at once,
  in its namespace and CPU share.
Measured: completion time and the cache's egress (NAR bytes nginx sent), and the agents' peak
memory (VmHWM) over the whole fan-out. Targets: with the mesh, the largest N finishes within
2x one node's time and the cache sends the closure about once (<= 1.5x); without the mesh the
time grows with N (the cache's link carries N closures); each agent peaks at <= 150 MB.
Everything made (namespaces, veths, bridge, qdiscs, cgroups, processes, store paths) is
removed on exit, on error and on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType

from prometheus_client.parser import text_string_to_metric_families

from niphas_common.nats_server import EmbeddedNats
from niphas_common.nix.runner import NixRunner, PathInfo
from niphas_common.nix.signing import SecretKey
from niphas_common.nix.store_path import StorePath

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for bench.*
from bench.bench_fanout import prepare, with_mesh
from bench.cpu_shares import CpuShares
from bench.http_servers import NGINX, Nginx
from bench.mesh_nodes import ROOT, Agents
from bench.netns import Network
from bench.proc_status import status_kb
from bench.report import Report, Series, add_json_option, verdict

AGENT_PORT = 5480
CACHE_PORT = 80
MESH_TIME_FACTOR = 2.0
"""Target: with the mesh the largest N finishes within this multiple of one node's time."""
EGRESS_FACTOR = 1.5
"""Target: with the mesh the cache sends at most this multiple of the closure."""
AGENT_PEAK_MB = 150.0
"""Target: an agent's peak resident memory over the fan-out."""
ROUND_TIMEOUT_S = 15 * 60


class Cluster:
    """The namespaces, the cache, NATS and one agent per node; `close` removes all of it."""

    def __init__(self, tmp: Path, args: argparse.Namespace, nodes: int, public: str) -> None:
        self.tmp, self.public = tmp, public
        self.net = Network(args.rate_mbit * 1e6)
        self.shares = CpuShares.create("bench-netmodel")
        self.names = [f"n{i:02}" for i in range(nodes)]
        self.nats: EmbeddedNats | None = None
        self.nginx: Nginx | None = None
        self.agents: Agents | None = None
        self.node_cores = args.node_cores
        self.mesh_only = args.mesh_only

    def link(self) -> None:
        """The namespaces and their links."""
        self.net.create()
        self.net.add("cache")
        for name in self.names:
            self.net.add(name)

    def start(self) -> None:
        """NATS, the cache and the agents; called from the hub's namespace, where nats-server
        then runs and this process's sockets (and its threads') are."""
        cache = self.net.hosts["cache"]
        self.nats = EmbeddedNats(self.tmp / "nats", host=self.net.hub.address)
        nats_url = self.nats.start()
        self.nginx = Nginx(self.tmp, self.tmp / "cache", host=cache.address, port=CACHE_PORT,
                           prefix=self.net.exec("cache", []))  # fmt: skip
        self.agents = Agents(self.tmp, nats_url, self.public, self.shares)
        agents = self.agents

        def start(name: str) -> str:
            host = self.net.hosts[name]
            return agents.start(name, host.address, AGENT_PORT, self.net.exec(name, []))

        started = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(start, self.names))
        print(
            f"{len(self.names)} agents ready in {time.perf_counter() - started:.0f} s", flush=True
        )
        if self.shares is not None:
            self.shares.limit(self.node_cores)

    def close(self) -> None:
        for stop in (
            self.agents.stop if self.agents else None,
            self.nginx.stop if self.nginx else None,
            self.nats.stop if self.nats else None,
        ):
            if stop is not None:
                try:
                    stop()
                except Exception as exc:  # the rest must still be removed
                    print(f"cleanup: {exc!r}", file=sys.stderr)
        if self.shares is not None:
            self.shares.remove()
        self.net.remove()

    def throttled_s(self, name: str) -> float:
        return 0.0 if self.shares is None else self.shares.throttled_s(name)

    async def plain(self, n: int, paths: list[StorePath], where: Path) -> float:
        """N `nix copy --from` the cache at once, each in its node's namespace and CPU share;
        seconds until all are done."""
        assert self.nginx is not None
        procs = []
        start = time.perf_counter()
        for name in self.names[:n]:
            runner = NixRunner(options={"trusted-public-keys": self.public})
            argv = self.net.exec(name, runner.command(
                "nix", "copy", "--from", self.nginx.url, "--to", str(where / name), *map(str, paths)
            ))  # fmt: skip
            if self.shares is not None:
                argv = self.shares.wrap(name, argv)
            env = {**os.environ, "XDG_CACHE_HOME": str(where / f"xdg-{name}")}
            procs.append(
                await asyncio.create_subprocess_exec(*argv, env=env, stderr=asyncio.subprocess.PIPE)
            )
        try:
            # stderr read as they go (nix prints a line per path), shown only on failure
            outs = await asyncio.wait_for(
                asyncio.gather(*(p.communicate() for p in procs)), ROUND_TIMEOUT_S
            )
        finally:
            for p in procs:
                if p.returncode is None:
                    p.kill()
                    await p.wait()
        failed = [err.decode(errors="replace") for p, (_, err) in zip(procs, outs, strict=True)
                  if p.returncode]  # fmt: skip
        if failed:
            raise RuntimeError(f"nix copy failed on {len(failed)} of {n} nodes:\n{failed[0]}")
        elapsed = time.perf_counter() - start
        if self.shares is not None:
            self.shares.limit(self.node_cores)  # groups made for nodes without an agent
        return elapsed


Measured = dict[str, list[float]]


def rounds(
    cluster: Cluster,
    ns: list[int],
    closures: list[list[StorePath]],
    infos: list[dict[str, PathInfo]],
) -> Measured:
    """One fan-out per node count with the mesh, then without; the table row as it goes."""
    assert cluster.nginx is not None
    assert cluster.agents is not None
    assert cluster.nats is not None
    nginx, agents = cluster.nginx, cluster.agents
    keys = ("mesh egress", "plain egress", "mesh time", "plain time", "max upload", "cpu", "held",
            "cpu nix", "first done", "median done", "busy", "missing", "batches",
            "host busy")  # fmt: skip
    measured: Measured = {k: [] for k in keys}
    measured["idle rss"] = [status_kb(p.pid, "VmRSS") / 1024 for p in agents.procs.values()]
    heads = ("nodes", "egress mesh", "egress without", "time mesh", "time without",
             "top upload", "CPU/node", "of it nix", "held back",
             "done first/median", "503s/404s/imports", "host/nodes cores")  # fmt: skip
    print("| " + " | ".join(heads) + " |")
    print("|" + "|".join("-" * (len(h) + 2) for h in heads) + "|")
    for n, closure, info in zip(ns, closures, infos, strict=True):
        size = sum(i.nar_size for i in info.values())
        nodes = cluster.names[:n]
        before = nginx.nar_bytes()
        sent = {name: cluster.net.sent(name) for name in nodes}
        cpu = {name: agents.cpu_split(name) for name in nodes}
        held = {name: cluster.throttled_s(name) for name in nodes}
        counted = counters(agents, nodes)
        busy_before = host_busy_s()
        ends: list[float] = []
        t_mesh = asyncio.run(with_mesh(cluster.nats.url, nginx.url, info, nodes, agents.urls, ends))
        host_cores = (host_busy_s() - busy_before) / t_mesh  # everything on the host
        mid = nginx.nar_bytes()
        # What the busiest node uploaded to its peers, and each node's CPU over the round
        # (its agent's own and its nix processes').
        top = max(cluster.net.sent(name) - sent[name] for name in nodes)
        after = {name: agents.cpu_split(name) for name in nodes}
        cpu_s = statistics.fmean(sum(after[x]) - sum(cpu[x]) for x in nodes)
        nix_s = statistics.fmean(after[x][1] - cpu[x][1] for x in nodes)
        held_s = statistics.fmean(cluster.throttled_s(name) - held[name] for name in nodes)
        t_plain = float("nan")
        if not cluster.mesh_only:
            plain = cluster.tmp / f"plain-{n}"
            t_plain = asyncio.run(cluster.plain(n, closure, plain))
            shutil.rmtree(plain, ignore_errors=True)
        e_mesh, e_plain = mid - before, nginx.nar_bytes() - mid
        # 503s and 404s met per node (asked again later) and `nix copy` imports per node.
        busy, missing, batches = (
            (b - a) / n for a, b in zip(counted, counters(agents, nodes), strict=True)
        )
        values = (e_mesh, e_plain, t_mesh, t_plain, top, cpu_s, held_s, nix_s, ends[0],
                  statistics.median(ends), busy, missing, batches, host_cores)  # fmt: skip
        for key, value in zip(keys, values, strict=True):
            measured[key].append(value)
        cells = (f"{n}", f"{e_mesh / size:.2f}x", f"{e_plain / size:.2f}x", f"{t_mesh:.2f}s",
                 f"{t_plain:.2f}s", f"{top / size:.2f}x", f"{cpu_s:.2f}s", f"{nix_s:.2f}s",
                 f"{held_s:.2f}s", f"{ends[0]:.1f}s/{statistics.median(ends):.1f}s",
                 f"{busy:.1f}/{missing:.1f}/{batches:.1f}",
                 f"{host_cores:.2f}/{cpu_s * n / t_mesh:.2f}")  # fmt: skip
        print("| " + " | ".join(c.rjust(len(h)) for c, h in zip(cells, heads, strict=True)) + " |",
              flush=True)  # fmt: skip
    measured["peak rss"] = [status_kb(p.pid, "VmHWM") / 1024 for p in agents.procs.values()]
    return measured


def host_busy_s() -> float:
    """CPU seconds the host's cores have been busy since boot (every process, the kernel's
    network path too), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def counters(agents: Agents, nodes: list[str]) -> tuple[float, float, float]:
    """Summed over `nodes`' agents (their /metrics): NAR requests turned away busy (503) and
    missing (404, a fetching peer with nothing yet), and `nix copy` import batches."""
    totals = {"busy": 0.0, "missing": 0.0, "batches": 0.0}
    for name in nodes:
        with urllib.request.urlopen(f"{agents.urls[name]}/metrics", timeout=30) as resp:
            text = resp.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "niphas_mesh_download_retries_total":
                    totals[sample.labels["reason"]] += sample.value
                elif sample.name == "niphas_mesh_import_batches_total":
                    totals["batches"] += sample.value
    return totals["busy"], totals["missing"], totals["batches"]


def netmodel_report(
    args: argparse.Namespace, ns: list[int], infos: list[dict[str, PathInfo]], m: Measured
) -> Report:
    closure = sorted(sum(i.nar_size for i in info.values()) for info in infos)[len(infos) // 2]
    report = Report(
        "netmodel",
        f"Fan-out of a {closure / 1e6:.0f} MB closure to N nodes behind "
        f"{args.rate_mbit:g} Mbit/s links (network namespaces)",
    )
    plain_name = "nix copy --from the cache on every node"
    one_mesh, one_plain = m["mesh time"][0], m["plain time"][0]
    for i, n in enumerate(ns):
        size = sum(x.nar_size for x in infos[i].values())
        egress, alone = m["mesh egress"][i], m["plain egress"][i]
        report.row(f"cache egress, {nodes(n)}", egress / 1e6, "MB", baseline=alone / 1e6,
                   baseline_name=plain_name, target=f"<= {EGRESS_FACTOR:g}x the closure",
                   met=egress <= EGRESS_FACTOR * size)  # fmt: skip
    for i, n in enumerate(ns):
        report.row(f"completion time, {nodes(n)}", m["mesh time"][i], "s",
                   baseline=m["plain time"][i], baseline_name=plain_name)  # fmt: skip
    big = len(ns) - 1
    report.row(f"mesh: {ns[big]} nodes vs 1 node", m["mesh time"][big], "s", baseline=one_mesh,
               baseline_name="the mesh with 1 node", target=f"<= {MESH_TIME_FACTOR:g}x",
               met=m["mesh time"][big] <= MESH_TIME_FACTOR * one_mesh)  # fmt: skip
    # Without the mesh the cache's link carries N closures: each N slower than the one before.
    grows = all(a < b for a, b in zip(m["plain time"], m["plain time"][1:], strict=False))
    report.row(f"nix copy: {ns[big]} nodes vs 1 node", m["plain time"][big], "s",
               baseline=one_plain, baseline_name="nix copy with 1 node",
               target="grows with N (each N slower than the one before)", met=grows)  # fmt: skip
    peak = max(m["peak rss"])
    report.row("mesh agent peak RSS (VmHWM) over the fan-out, worst agent", peak, "MB",
               baseline=max(m["idle rss"]), baseline_name="the same agent set idle (VmRSS)",
               target=f"<= {AGENT_PEAK_MB:g} MB", met=peak <= AGENT_PEAK_MB)  # fmt: skip
    xs = [float(n) for n in ns]
    for plot, key, unit, scale in (("completion time", "time", "s", 1.0),
                                   ("cache egress", "egress", "MB", 1e-6)):  # fmt: skip
        for mode, label in (("mesh", "with the mesh"), ("plain", "without (nix copy)")):
            ys = [v * scale for v in m[f"{mode} {key}"]]
            report.series.append(Series(plot, label, xs, ys, "nodes", f"{plot} ({unit})"))
    explain(report, args, ns, closure, m)
    return report


def explain(
    report: Report, args: argparse.Namespace, ns: list[int], closure: int, m: Measured
) -> None:
    """The notes: the set-up, memory, and where the mesh's time went per N."""
    link_s = closure * 8 / (args.rate_mbit * 1e6)
    cores = "no CPU share (no writable cgroup)" if args.node_cores is None else (
        f"{args.node_cores:.3g} of a core per node (a cgroup quota on its agent and its nix "
        "processes)")  # fmt: skip
    report.note(
        f"Each node and the cache in a network namespace of its own behind a veth limited to "
        f"{args.rate_mbit:g} Mbit/s each way (tc tbf on both ends), all on one bridge; one "
        f"closure ({closure / 1e6:.1f} MB in {args.paths} paths) crosses one link in "
        f"{link_s:.1f} s at that rate. {cores}; the host has {os.cpu_count()} cores, so at "
        f"large N the nodes' quotas add up to more than the host and CPU contends with the "
        f"network. nginx serves the cache, nats-server runs on the hub, the agents run with "
        f"default settings; all {max(ns)} agents run during every round. Idle agent RSS "
        f"{min(m['idle rss']):.0f}-{max(m['idle rss']):.0f} MB, peak over the fan-out "
        f"{min(m['peak rss']):.0f}-{max(m['peak rss']):.0f} MB."
    )
    per_n = "; ".join(
        f"N = {n}: {m['max upload'][i] / closure:.2f}x, {m['cpu'][i]:.2f} s "
        f"({m['cpu nix'][i]:.2f} s nix), {m['held'][i]:.2f} s, {m['batches'][i]:.1f}, "
        f"{m['busy'][i]:.1f}/{m['missing'][i]:.1f}, {m['first done'][i]:.1f}/"
        f"{m['median done'][i]:.1f}/{m['mesh time'][i]:.1f} s, {m['host busy'][i]:.2f} cores"
        for i, n in enumerate(ns)
    )
    report.note(
        "Where the mesh's time goes, per N with the mesh: the most one node uploaded to its "
        "peers (x the closure, from its link's counter); the CPU time per node (its agent and "
        "the nix processes it ran; of it nix's) and how long its quota held it back, on "
        "average; `nix copy` imports per node; NAR requests per node a holder turned away for "
        "now (503: its upload slots were full; 404: a fetching peer had no byte yet); when the "
        "first node, the median node and the last had the whole closure; and how many of "
        f"the host's cores were busy over the round (every process): {per_n}."
    )
    report.note(floor(args, ns, m))


def floor(args: argparse.Namespace, ns: list[int], m: Measured) -> str:
    """The CPU floor of the largest N against one node's measured time, argued with numbers:
    every node receives, verifies and imports the closure (and with the mesh passes on its
    share), so a round takes at least its nodes' CPU over the host's cores, and at least one
    node's CPU over its quota."""
    cores = os.cpu_count() or 1
    big, n = len(ns) - 1, ns[-1]
    cpu_1, cpu_n, t_1 = m["cpu"][0], m["cpu"][big], m["mesh time"][0]
    floor_n = n * cpu_n / cores
    if args.node_cores is not None:
        floor_n = max(floor_n, cpu_n / args.node_cores)
    quota = "" if args.node_cores is None else (
        f" (one node alone: {cpu_1:.2f} s at {args.node_cores:.3g} of a core = "
        f"{cpu_1 / args.node_cores:.1f} s, measured {t_1:.1f} s)")  # fmt: skip
    return (
        f"The CPU floor: every node receives, verifies and imports the closure, and with the "
        f"mesh passes on its share to peers, all on {cores} cores. One node used {cpu_1:.2f} s "
        f"of CPU{quota}; at N = {n} each used {cpu_n:.2f} s, {n} x {cpu_n:.2f} s / {cores} "
        f"cores = {n * cpu_n / cores:.1f} s of the whole host, so N = {n} cannot finish before "
        f"{floor_n:.1f} s = {floor_n / t_1:.2f}x one node's time (target "
        f"{MESH_TIME_FACTOR:g}x), before nats-server, nginx, the kernel's forwarding of "
        f"{n} closures through the bridge, and anything else running on the host take their "
        f"part ({m['host busy'][big]:.2f} of {cores} cores were busy over that round; "
        f"measured {m['mesh time'][big]:.1f} s = {m['mesh time'][big] / t_1:.2f}x). Within "
        f"the target only if each node's CPU at N = {n} stays under "
        f"{MESH_TIME_FACTOR * t_1 * cores / n:.2f} s with the host otherwise idle."
    )


def nodes(n: int) -> str:
    return "1 node" if n == 1 else f"{n} nodes"


class Stopped(Exception):
    """SIGTERM, raised in the main thread so every cleanup below runs."""


def on_sigterm(signum: int, _frame: FrameType | None) -> None:
    raise Stopped(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--nodes", default="2,4,8,16,32", help="comma-separated node counts (1 always runs too)"
    )
    parser.add_argument("--rate-mbit", type=float, default=128.0,
                        help="every link's rate, Mbit/s each way (default: a 32 MB closure "
                        "crosses one link in ~2 s)")  # fmt: skip
    parser.add_argument("--size-mb", type=int, default=32, help="closure size per round")
    parser.add_argument("--paths", type=int, default=8, help="store paths per closure")
    parser.add_argument("--files", type=int, default=200, help="files per closure")
    parser.add_argument("--node-cores", type=float, default=None,
                        help="CPU quota per node in cores (default: the host's cores / the "
                        "largest N, what every node can have at once)")  # fmt: skip
    parser.add_argument("--mesh-only", action="store_true",
                        help="measure the mesh only (no nix copy rounds, no report): for trying "
                        "changes to the mesh quickly")  # fmt: skip
    add_json_option(parser)
    args = parser.parse_args()
    try:
        ns = sorted({1, *(int(n) for n in args.nodes.split(","))})
    except ValueError:
        parser.error(f"--nodes must be comma-separated integers, got {args.nodes!r}")
    if ns[0] < 1 or args.size_mb < 1 or args.paths < 1 or args.rate_mbit <= 0:
        parser.error("--nodes, --size-mb, --paths and --rate-mbit must be positive")
    if args.node_cores is None:
        args.node_cores = (os.cpu_count() or 1) / ns[-1]
    if os.geteuid() != 0:
        parser.error("network namespaces need root")
    if not Path(NGINX).exists():
        subprocess.run(["bash", str(ROOT / "scripts" / "setup-bench-tools.sh")], check=True)
    # Both stop the run through the cleanup below, even where a shell started it with SIGINT
    # ignored (a background job).
    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return run(args, ns)
    except (Stopped, KeyboardInterrupt) as stop:
        print(f"stopped ({str(stop) or 'SIGINT'}); everything made was removed", file=sys.stderr)
        return 130


def run(args: argparse.Namespace, ns: list[int]) -> int:
    """Build the network, measure every N, remove everything; the exit status."""
    host = NixRunner()
    closures: list[list[StorePath]] = []
    with tempfile.TemporaryDirectory(prefix="bench-netmodel-") as tmp_name:
        tmp = Path(tmp_name)
        key = SecretKey.generate("bench-1")
        (tmp / "sk").write_text(str(key))
        cluster = Cluster(tmp, args, ns[-1], str(key.public_key))
        if cluster.shares is None:
            args.node_cores = None
        try:
            infos = prepare(host, tmp, ns, args, closures)
            cluster.link()
            with cluster.net.entered("hub"):
                cluster.start()
                measured = rounds(cluster, ns, closures, infos)
        finally:
            # A second Ctrl-C or SIGTERM must not cut the cleanup short.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            cluster.close()
            if added := [path for closure in closures for path in closure]:
                host.run("nix-store", "--delete", *map(str, added), check=False)
    if args.mesh_only:
        print(f"\n{floor(args, ns, measured)}")
        return 0
    report = netmodel_report(args, ns, infos, measured)
    print()
    for row in report.rows:
        against = "" if row.baseline is None else (
            f" vs {row.baseline:.2f} {row.unit} {row.baseline_name}"
            + ("" if row.ratio is None else f" ({row.ratio:.2f}x)"))  # fmt: skip
        target = "" if row.target is None else f"; target {row.target}: {verdict(row.met)}"
        print(f"- {row.measure}: {row.ours:.2f} {row.unit}{against}{target}")
    for note in report.notes:
        print(f"\n{note}")
    report.write(args.json)
    return 0 if report.all_met else 1


if __name__ == "__main__":
    sys.exit(main())
