"""Eval service benchmark, both halves measured against a baseline in the same run.

1. Webhook ingress: signed GitHub push deliveries -> `push.received` acknowledged by
   JetStream -> 202. The ingress runs as its own process (`niphas eval --role ingress`, at the
   default log level); the load generator is an aiohttp client in this process with
   `--concurrency` requests in flight. Reported: deliveries/s and p50/p99 latency (request
   sent -> 202 received) beside floors, each a bare aiohttp server on the same event loop
   doing more of the ingress's work: reading the body and answering 202 (the HTTP floor); also
   storing it on JetStream with a Msg-Id, waiting for the ack (the floor of aiohttp + nats-py);
   also as a `PushReceived` through the project's publisher (`Bus.publish`, as the ingress
   does); and granian (a server written in Rust) answering 202, and also publishing: what
   moving the ingress off aiohttp could save at most. Per side: CPU time per delivery of the
   server and of nats-server, and how busy the load generator was (near 100%: the client, not
   the server, bounds that row); the differences between the rows tell where the ingress's
   CPU goes. Targets: ingress >= 0.6x the HTTP floor's deliveries/s, p99 <= 3x. Every accepted
   delivery is checked to be in the stream.
2. Evaluation overhead: a generated flake in a local git repository, one commit per round:
   `--packages` derivations that each do some mkDerivation-like work (`--work` generated
   variables and flags each), then, as a worst case, `--wide` trivial ones. Per commit: the
   bare `nix eval` of what the worker computes (drvPath, outputs, name, system, mainProgram of
   every package) vs the worker end to end (push.received published -> eval.done received:
   consumer, claim in the results bucket, `nix eval` under prlimit through the wrapper flake,
   publish). Both run warm (the commit is fetched once before either is timed), in alternating
   order. Target: worker / bare <= 1.3 on the first flake. The worker adds a cost per
   evaluation (bus, results bucket, process start; ~10 ms) and per attribute (JSON,
   validation, a larger eval.done; ~20 us), printed in ms; the wide flake of trivial packages,
   which nix evaluates in ~0.1 s, shows it at its largest (a nixpkgs-based flake takes seconds).

Run: .venv/bin/python bench/bench_eval.py [--deliveries 3000] [--concurrency 32]
     [--packages 200] [--work 1000] [--wide 2000] [--rounds 7] [--ingress-only]
     [--ingress-rounds 3] [--event-loop uvloop|asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import uvloop

from niphas_common.bus.bus import Bus
from niphas_common.nats_server import EmbeddedNats
from niphas_common.nix.runner import NixRunner
from niphas_common.settings import NatsSettings
from niphas_demo.sample import FlakeRepo
from niphas_eval.app import build_worker
from niphas_eval.settings import EvalSettings, this_system
from niphas_schemas import PushReceived

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for bench.report
from bench.bench_mesh import tree_cpu_seconds
from bench.http_servers import free_port
from bench.report import Report, add_json_option

SECRET = "bench-secret"
CLONE = "https://git.example.test/acme/app.git"
LOOP = """
import asyncio, sys
def new_loop():  # the event loop the ingress runs on too (argv[2])
    if sys.argv[2] == "uvloop":
        import uvloop
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()
"""
BARE_SERVER = (
    LOOP
    + """
from aiohttp import web
async def hook(request):
    await request.read()
    return web.json_response({"status": "accepted"}, status=202)
app = web.Application(client_max_size=25 * 1024 * 1024)
app.router.add_post("/hooks/github", hook)
app.router.add_get("/readyz", lambda r: web.Response(text="ready"))
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None,
            loop=new_loop())
"""
)
BARE_JETSTREAM_SERVER = (
    LOOP
    + """
import os
import nats
from aiohttp import web
from nats.js.api import StreamConfig
async def connect(app):
    app["nc"] = await nats.connect(os.environ["NATS_URL"])
    app["js"] = app["nc"].jetstream()
    await app["js"].add_stream(StreamConfig(name="BENCH_FLOOR", subjects=["bench.floor"]))
async def hook(request):
    body = await request.read()
    msg_id = request.headers["X-GitHub-Delivery"]
    ack = await request.app["js"].publish("bench.floor", body, headers={"Nats-Msg-Id": msg_id})
    return web.json_response({"status": "accepted", "stream_seq": ack.seq}, status=202)
app = web.Application(client_max_size=25 * 1024 * 1024)
app.on_startup.append(connect)
app.router.add_post("/hooks/github", hook)
app.router.add_get("/readyz", lambda r: web.Response(text="ready"))
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None,
            loop=new_loop())
"""
)
BARE_BUS_SERVER = (
    LOOP
    + """
import hashlib
from aiohttp import web
from niphas_common.bus.bus import Bus
from niphas_common.settings import NatsSettings
from niphas_schemas import PushReceived
async def connect(app):
    app["bus"] = await Bus.connect(NatsSettings(), name="bench-floor", provision=False)
async def hook(request):
    body = await request.read()
    push = PushReceived(
        forge="github", repository="@CLONE@", ref="refs/heads/main",
        commit=hashlib.sha1(body).hexdigest(), delivery_id=request.headers["X-GitHub-Delivery"],
    )
    ack = await request.app["bus"].publish(push)
    return web.json_response({"status": "accepted", "stream_seq": ack.seq}, status=202)
app = web.Application(client_max_size=25 * 1024 * 1024)
app.on_startup.append(connect)
app.router.add_post("/hooks/github", hook)
app.router.add_get("/readyz", lambda r: web.Response(text="ready"))
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None,
            loop=new_loop())
"""
).replace("@CLONE@", CLONE)
GRANIAN_SERVER = (
    LOOP
    + """
import json, os
from granian.constants import Interfaces
from granian.server.embed import Server
PUBLISH = len(sys.argv) > 3  # also store each body on JetStream, as the JetStream floor
async def main():
    if PUBLISH:
        import nats
        from nats.js.api import StreamConfig
        nc = await nats.connect(os.environ["NATS_URL"])
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="BENCH_FLOOR_RUST", subjects=["bench.rust"]))
    async def app(scope, proto):
        if scope.path == "/readyz":
            proto.response_str(200, [], "ready")
            return
        body = await proto()
        answer = {"status": "accepted"}
        if PUBLISH:
            msg_id = scope.headers.get("x-github-delivery")
            ack = await js.publish("bench.rust", body, headers={"Nats-Msg-Id": msg_id})
            answer["stream_seq"] = ack.seq
        proto.response_bytes(202, [("content-type", "application/json")],
                             json.dumps(answer).encode())
    server = Server(app, address="127.0.0.1", port=int(sys.argv[1]), interface=Interfaces.RSGI,
                    log_enabled=False)
    await server.serve()
loop = new_loop()
loop.run_until_complete(main())
"""
)
SIDES = {
    "bare aiohttp, 202 only (floor)": ["-c", BARE_SERVER],
    "bare aiohttp + JetStream publish": ["-c", BARE_JETSTREAM_SERVER],
    "bare aiohttp + niphas Bus.publish": ["-c", BARE_BUS_SERVER],
    "niphas eval ingress": ["-m", "niphas_common", "eval", "--role", "ingress", "--listen"],
    "bare granian (Rust), 202 only": ["-c", GRANIAN_SERVER],
    "bare granian + JetStream publish": ["-c", GRANIAN_SERVER, "publish"],
}
"""Each side's server: a floor answering 202 after ever more of the ingress's work (reading
the body; storing it on JetStream with a Msg-Id; as a `PushReceived` through the project's
publisher, as the ingress does), then the ingress itself."""
INGRESS = "niphas eval ingress"


def delivery(i: int) -> tuple[bytes, dict[str, str]]:
    after = hashlib.sha1(f"commit-{i}".encode()).hexdigest()
    body = json.dumps(
        {
            "ref": "refs/heads/main",
            "before": "0" * 40,
            "after": after,
            "deleted": False,
            "commits": [{"id": after, "message": "change " * 20}],
            "repository": {"full_name": "acme/app", "clone_url": CLONE, "name": "app"},
            "pusher": {"name": "octocat", "email": "octocat@example.test"},
        }
    ).encode()
    signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return body, {
        "Content-Type": "application/json",
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": str(uuid.uuid4()),
        "X-Hub-Signature-256": f"sha256={signature}",
    }


async def wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(400):
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                async with http.get(url + "/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError("server never became ready")


async def load(
    url: str, n: int, concurrency: int, *, first: int = 0
) -> tuple[float, list[float], int]:
    """(deliveries/s, latencies in s, count answered 202) of pushes `first`..`first + n`."""
    requests = [delivery(i) for i in range(first, first + n)]
    latencies: list[float] = []
    accepted = 0
    queue: asyncio.Queue[tuple[bytes, dict[str, str]]] = asyncio.Queue()
    for item in requests:
        queue.put_nowait(item)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def client() -> None:
            nonlocal accepted
            while not queue.empty():
                body, headers = queue.get_nowait()
                started = time.perf_counter()
                async with http.post(url + "/hooks/github", data=body, headers=headers) as resp:
                    await resp.read()
                    latencies.append(time.perf_counter() - started)
                    accepted += resp.status == 202

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return n / elapsed, latencies, accepted


@dataclass
class Side:
    """One server under load: what the interleaved rounds measured of it."""

    url: str
    proc: subprocess.Popen[bytes]
    rates: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    accepted: int = 0
    wall_s: float = 0.0
    cpu_s: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    """CPU seconds of the server, of nats-server and of this process (the load generator)."""

    def cpu_now(self, nats_pid: int | None) -> list[float]:
        nats = tree_cpu_seconds(nats_pid) if nats_pid else 0.0
        return [tree_cpu_seconds(self.proc.pid), nats, time.process_time()]

    def cpu_us(self, which: int) -> float:
        """CPU microseconds per delivery of server (0), nats-server (1), load generator (2)."""
        return self.cpu_s[which] / (len(self.latencies) or 1) * 1e6


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def bench_ingress(
    n: int, concurrency: int, rounds: int, event_loop: str, report: Report
) -> None:
    per = max(1, n // rounds)
    n = per * rounds
    print(
        f"== webhook ingress: {n} signed GitHub pushes, {concurrency} in flight, "
        f"{rounds} interleaved rounds, every server on {event_loop}"
    )
    with tempfile.TemporaryDirectory() as tmp, EmbeddedNats(Path(tmp) / "nats") as server:
        env = {
            **os.environ,
            "NATS_URL": server.url,
            "NIPHAS_STATE_DIR": str(Path(tmp) / "state"),
            "NIPHAS_EVAL_EVENT_LOOP": event_loop,
            "NIPHAS_EVAL_WEBHOOK_SECRETS": json.dumps(
                {"acme/app": {"forge": "github", "secret": SECRET}}
            ),
        }
        bus = await Bus.connect(NatsSettings(url=server.url), name="bench")
        sides: dict[str, Side] = {}
        stored = 0  # push.received events the ingress's timed rounds added
        try:
            for label, argv in SIDES.items():
                port = free_port()
                if label == INGRESS:
                    argv = [*argv, f"127.0.0.1:{port}"]
                else:  # python -c SCRIPT PORT LOOP [what else]
                    argv = [*argv[:2], str(port), event_loop, *argv[2:]]
                url = f"http://127.0.0.1:{port}"
                sides[label] = Side(url, subprocess.Popen([sys.executable, *argv], env=env))
                await wait_ready(url, sides[label].proc)
                # Warm-up (not counted), with other pushes: the same push is stored once.
                await load(url, min(200, n), concurrency, first=n)
            # Interleaved rounds: every side sees the same machine noise.
            for r in range(rounds):
                for label, side in sides.items():
                    before = (await bus.js.stream_info("PUSH_RECEIVED")).state.messages
                    cpu = side.cpu_now(server.pid)
                    started = time.perf_counter()
                    rate, lat, ok = await load(side.url, per, concurrency, first=r * per)
                    side.wall_s += time.perf_counter() - started
                    side.cpu_s = [
                        t + b - a
                        for t, a, b in zip(side.cpu_s, cpu, side.cpu_now(server.pid), strict=True)
                    ]
                    side.rates.append(rate)
                    side.latencies.extend(lat)
                    side.accepted += ok
                    if label == INGRESS:
                        after = (await bus.js.stream_info("PUSH_RECEIVED")).state.messages
                        stored += after - before
        finally:
            for side in sides.values():
                side.proc.terminate()
                side.proc.wait(30)
            await bus.close()
    show_ingress(sides, n, stored, report)


def show_ingress(sides: dict[str, Side], n: int, stored: int, report: Report) -> None:
    rate = {label: statistics.median(side.rates) for label, side in sides.items()}
    floor_name, js_name, bus_name, *_ = SIDES
    floor, js, ours = sides[floor_name], sides[js_name], sides[INGRESS]
    floor_rate, js_rate, our_rate = rate[floor_name], rate[js_name], rate[INGRESS]
    print(
        f"| {'side':<33} | {'deliveries/s':>12} | {'p50 ms':>6} | {'p99 ms':>6} | ratio | "
        f"server CPU us | nats-server us | load generator us, busy |"
    )
    print(f"|{'-' * 35}|{'-' * 14}|{'-' * 8}|{'-' * 8}|-------|{'-' * 15}|{'-' * 16}|{'-' * 26}|")
    for label, side in sides.items():
        assert side.accepted == n, f"{label}: only {side.accepted}/{n} answered 202"
        busy = side.cpu_s[2] / side.wall_s
        print(
            f"| {label:<33} | {rate[label]:>12,.0f} | {pct(side.latencies, 0.5) * 1e3:>6.1f} | "
            f"{pct(side.latencies, 0.99) * 1e3:>6.1f} | {rate[label] / floor_rate:>5.2f} | "
            f"{side.cpu_us(0):>13.0f} | {side.cpu_us(1):>14.0f} | "
            f"{side.cpu_us(2):>13.0f}, {busy:>8.0%} |"
        )
    print(
        "CPU us: per delivery, of the server process, of nats-server, of the load generator (this "
        "process: the aiohttp client), and the share of a core it used.\nA side whose load "
        "generator is near "
        "100% busy is bounded by the client, not by its server: its server CPU per delivery is "
        "then the fairer comparison."
    )
    steps = [("HTTP (aiohttp floor)", floor.cpu_us(0)),
             ("JetStream publish + ack (nats-py)", js.cpu_us(0) - floor.cpu_us(0)),
             ("PushReceived + the project's publisher", sides[bus_name].cpu_us(0) - js.cpu_us(0)),
             ("the rest: the ingress's checks (headers, HMAC, JSON, trust, identity) and answer",
              ours.cpu_us(0) - sides[bus_name].cpu_us(0))]  # fmt: skip
    print("where the ingress's server CPU per delivery goes (differences of the rows):")
    for step, us in steps:
        print(f"  {us:>5.0f} us  {step}")
    rust = sides["bare granian + JetStream publish"]
    print(
        f"granian instead of aiohttp: the JetStream floor at {rust.cpu_us(0):.0f} us per "
        f"delivery instead of {js.cpu_us(0):.0f} us (at most that much less for the ingress)"
    )
    print(
        f"ingress server CPU per delivery: {ours.cpu_us(0):.0f} us = "
        f"{ours.cpu_us(0) / floor.cpu_us(0):.1f}x the bare server's, "
        f"{ours.cpu_us(0) / js.cpu_us(0):.1f}x the bare JetStream publisher's"
    )
    print(f"push.received stored by the ingress's rounds: {stored} (every 202 a stored event)")
    assert stored == n, f"{n} deliveries answered 202 but {stored} push.received stored"
    lat, floor_lat = ours.latencies, floor.latencies
    bare = "bare aiohttp server answering 202"
    report.row("webhook deliveries/s (signed -> push.received acked)", our_rate, "deliveries/s",
               baseline=floor_rate, baseline_name=bare, target=">= 0.6x",
               met=our_rate / floor_rate >= 0.6)  # fmt: skip
    report.row("bare aiohttp + JetStream publish acked (the stack's floor)", js_rate,
               "deliveries/s", baseline=floor_rate, baseline_name=bare)  # fmt: skip
    report.row("bare aiohttp + niphas Bus.publish acked (the project's publisher)",
               rate[bus_name], "deliveries/s", baseline=floor_rate,
               baseline_name=bare)  # fmt: skip
    report.row("webhook deliveries/s vs the stack's floor", our_rate, "deliveries/s",
               baseline=js_rate, baseline_name="bare aiohttp + JetStream publish")  # fmt: skip
    report.row("webhook server CPU per delivery", ours.cpu_us(0), "us",
               baseline=floor.cpu_us(0), baseline_name=bare)  # fmt: skip
    report.row("webhook latency p50", pct(lat, 0.5) * 1e3, "ms",
               baseline=pct(floor_lat, 0.5) * 1e3, baseline_name=bare)  # fmt: skip
    p99, floor_p99 = pct(lat, 0.99), pct(floor_lat, 0.99)
    report.row("webhook latency p99", p99 * 1e3, "ms", baseline=floor_p99 * 1e3,
               baseline_name=bare, target="<= 3x", met=p99 <= 3 * floor_p99)  # fmt: skip


# -- evaluation overhead -------------------------------------------------------------------

FLAKE = """\
{
  inputs.tools = { url = "path:@TOOLS@"; flake = false; };
  outputs = { self, tools }:
    let
      system = "@SYSTEM@";
      bb = "${tools}/bin/busybox";
      base = derivation {
        inherit system; name = "base-@VERSION@"; builder = bb;
        args = [ "sh" "-c" "echo @VERSION@ > $out" ];
      };
      # What nixpkgs' mkDerivation does per package (attribute sets merged into the
      # derivation's environment, flag strings built), in miniature: @WORK@ variables.
      env = i: builtins.listToAttrs (builtins.genList (j: {
        name = "NIPHAS_VAR_${toString j}"; value = "${toString (i * j)}-@VERSION@";
      }) @WORK@);
      flags = i: builtins.concatStringsSep " "
        (builtins.genList (j: "-DOPTION_${toString j}=${toString (i + j)}") @WORK@);
      mk = i: derivation ({
        inherit system; name = "pkg-${toString i}-@VERSION@"; builder = bb;
        outputs = [ "out" "doc" ];
        FLAGS = flags i;
        args = [ "sh" "-c" "${bb} mkdir -p $out/bin $doc && ${bb} cat ${base} > $out/bin/p" ];
      } // env i) // { meta.mainProgram = "p"; };
    in {
      packages.${system} = builtins.listToAttrs
        (builtins.genList (i: { name = "pkg${toString i}"; value = mk i; }) @PACKAGES@);
    };
}
"""

BARE_APPLY = (
    "ps: builtins.mapAttrs (n: p: { inherit (p) drvPath name system; "
    "outputs = builtins.listToAttrs (map (o: { name = o; value = p.${o}.outPath; }) p.outputs); "
    "mainProgram = p.meta.mainProgram or null; }) ps"
)


def sample_commits(
    tmp: Path, runner: NixRunner, system: str, packages: int, work: int, rounds: int
) -> tuple[str, str, list[str]]:
    """(tools store path, repository URL, one commit per round) of the generated flake."""
    (tmp / "tools" / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", tmp / "tools" / "bin" / "busybox")
    tools = runner.add_to_store(tmp / "tools")
    runner.add_root(tools, tmp / "tools-root")
    repo = FlakeRepo(tmp / "forge" / "app")
    repo.ensure()
    commits = []
    for i in range(rounds):
        text = (
            FLAKE.replace("@TOOLS@", str(tools)).replace("@SYSTEM@", system)
            .replace("@VERSION@", f"v{i}").replace("@PACKAGES@", str(packages))
            .replace("@WORK@", str(work))
        )  # fmt: skip
        # Committed with its flake.lock: the worker takes inputs only from the lock.
        commits.append(repo.commit_flake(text, f"v{i}", must_lock=True))
    return str(tools), repo.url, commits


class WorkerRoundTrip:
    """push.received published -> the eval.done it caused (one evaluation at a time)."""

    def __init__(self, bus: Bus, url: str) -> None:
        self.bus = bus
        self.url = url
        self.arrived: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_done(self, msg: object) -> None:
        self.arrived.put_nowait(getattr(msg, "data", b""))

    async def __call__(self, commit: str) -> tuple[float, dict[str, object]]:
        push = PushReceived(
            forge="github", repository=self.url, ref="refs/heads/main", commit=commit,
            delivery_id=uuid.uuid4().hex,
        )  # fmt: skip
        started = time.perf_counter()
        await self.bus.publish(push)
        data = await asyncio.wait_for(self.arrived.get(), 600)
        return time.perf_counter() - started, json.loads(data)


async def alternate(
    bare: Callable[[str], float],
    through_worker: WorkerRoundTrip,
    commits: list[str],
    packages: int,
) -> tuple[list[float], list[float]]:
    """(bare seconds, worker seconds) per commit, the order alternating, both warm."""
    bares: list[float] = []
    workers: list[float] = []
    for i, commit in enumerate(commits):
        bare(commit)  # fetch the commit once (warm), untimed
        if i % 2 == 0:
            bares.append(bare(commit))
            took, done = await through_worker(commit)
        else:
            took, done = await through_worker(commit)
            bares.append(bare(commit))
        workers.append(took)
        assert done["status"] == "succeeded", done.get("error")
        assert len(done["attributes"]) == packages  # type: ignore[arg-type]
    return bares, workers


async def bench_eval(packages: int, work: int, rounds: int) -> tuple[float, float]:
    """(bare median, worker median) in seconds."""
    system = this_system()
    runner = NixRunner()
    print(
        f"\n== evaluation: {packages} packages (2 outputs each, {work} generated variables "
        f"and flags each), {rounds} commits"
    )
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        tools, url, commits = sample_commits(tmp, runner, system, packages, work, rounds)

        def bare(commit: str) -> float:
            ref = f"git+{url}?ref=refs%2Fheads%2Fmain&rev={commit}#packages.{system}"
            started = time.perf_counter()
            runner.run("nix", "eval", "--json", "--no-write-lock-file", ref, "--apply", BARE_APPLY)
            return time.perf_counter() - started

        with EmbeddedNats(tmp / "nats") as server:
            settings = EvalSettings(
                state_dir=tmp / "state",
                allowed_refs=[f"file://{tmp}/forge/*", f"path:{tools}"],
                concurrency=1,
            )
            bus = await Bus.connect(NatsSettings(url=server.url), name="bench")
            worker = await build_worker(bus, settings, runner=runner)
            through_worker = WorkerRoundTrip(bus, url)
            sub = await bus.nc.subscribe("eval.done", cb=through_worker.on_done)
            stop = asyncio.Event()
            serving = asyncio.create_task(
                bus.serve([worker.subscription()], stop, fetch_timeout_s=0.2)
            )
            bares, workers = await alternate(bare, through_worker, commits, packages)
            stop.set()
            await serving
            await sub.unsubscribe()
            await bus.close()
    return show_eval(rounds, bares, workers)


def show_eval(rounds: int, bares: list[float], workers: list[float]) -> tuple[float, float]:
    overhead = statistics.median(w - b for w, b in zip(workers, bares, strict=True))
    b, w = statistics.median(bares), statistics.median(workers)
    print(f"median of {rounds} commits, alternating order, both warm")
    print(f"| {'side':<44} | {'seconds':>8} | ratio |")
    print(f"|{'-' * 46}|{'-' * 10}|-------|")
    print(f"| {'bare nix eval --apply (baseline)':<44} | {b:>8.3f} | {1:>5.2f} |")
    label = "worker: push.received -> eval.done"
    print(f"| {label:<44} | {w:>8.3f} | {w / b:>5.2f} |")
    print(f"worker's added cost per evaluation: {overhead * 1e3:.0f} ms (median of differences)")
    return b, w


async def main(args: argparse.Namespace) -> None:
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    report = Report("eval", "Eval: webhook ingress and evaluation overhead")
    report.note(
        f"ingress: {args.deliveries} signed GitHub pushes, {args.concurrency} in flight, "
        f"{args.ingress_rounds} interleaved rounds (median deliveries/s, latencies of all)"
    )
    await bench_ingress(
        args.deliveries, args.concurrency, args.ingress_rounds, args.event_loop, report
    )
    if args.ingress_only:
        report.write(args.json)
        return
    if shutil.which("nix") is None:
        print("\nnix is not installed: evaluation benchmark skipped (run scripts/setup-nix.sh)")
        report.note("nix is not installed: evaluation benchmark skipped")
        report.write(args.json)
        return
    bare, worker = await bench_eval(args.packages, args.work, args.rounds)
    wide_bare, wide_worker = await bench_eval(args.wide, 0, args.rounds)
    verdict = "ok" if worker / bare <= 1.3 else "MISSED"
    print(
        f"\nevaluation overhead, {args.packages} packages with mkDerivation-like work: worker / "
        f"bare = {worker / bare:.2f} (target <= 1.3: {verdict})"
    )
    bare_name = "bare nix eval --apply of the same flake"
    report.row(f"evaluation, {args.packages} packages (push.received -> eval.done)", worker, "s",
               baseline=bare, baseline_name=bare_name, target="<= 1.3x",
               met=worker / bare <= 1.3)  # fmt: skip
    report.row(f"evaluation, {args.wide} trivial packages (worst case)", wide_worker, "s",
               baseline=wide_bare, baseline_name=bare_name)  # fmt: skip
    report.note(f"evaluation: median of {args.rounds} commits, alternating order, both warm")
    report.write(args.json)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deliveries", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--packages", type=int, default=200, help="packages of the main flake")
    parser.add_argument(
        "--work", type=int, default=1000, help="generated variables and flags per package"
    )
    parser.add_argument("--wide", type=int, default=2000, help="trivial packages (worst case)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--ingress-only", action="store_true", help="measure the webhook ingress only"
    )
    parser.add_argument(
        "--ingress-rounds", type=int, default=3, help="interleaved rounds of the ingress sides"
    )
    parser.add_argument(
        "--event-loop", choices=("uvloop", "asyncio"), default=EvalSettings().event_loop,
        help="the event loop of the ingress and of the bare servers (default: the ingress's)",
    )  # fmt: skip
    add_json_option(parser)
    args = parser.parse_args()
    # The load generator (and the worker of part 2) on the servers' loop too: on asyncio's own
    # the client bounds the floor rows sooner.
    loop_factory = uvloop.new_event_loop if args.event_loop == "uvloop" else None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main(args))
