"""Eval service benchmark, both halves measured against a baseline in the same run.

1. Webhook ingress: signed GitHub push deliveries -> `push.received` acknowledged by
   JetStream -> 202. The ingress runs as its own process (`niphas eval --role ingress`); the
   load generator is an aiohttp client in this process with `--concurrency` requests in flight.
   Reported: deliveries/s and p50/p99 latency (request sent -> 202 received), beside a bare
   aiohttp server in the same setup that reads the body and answers 202 (no signature, no
   JSON, no NATS): the HTTP floor; and beside a bare aiohttp server that publishes each body
   to JetStream with a Msg-Id and answers 202 once it is acknowledged: the floor of this
   stack (aiohttp + nats-py), which no ingress doing the same JetStream publish can pass.
   Targets: ingress >= 0.6x the HTTP floor's deliveries/s, p99 <= 3x. Every accepted
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
     [--ingress-rounds 3]
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
from pathlib import Path

import aiohttp

from niphas_common.bus.bus import Bus
from niphas_common.nats_server import EmbeddedNats
from niphas_common.nix.runner import NixRunner
from niphas_common.settings import NatsSettings
from niphas_demo.sample import FlakeRepo
from niphas_eval.app import build_worker
from niphas_eval.settings import EvalSettings, this_system
from niphas_schemas import PushReceived

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for bench.report
from bench.http_servers import free_port
from bench.report import Report, add_json_option

SECRET = "bench-secret"
CLONE = "https://git.example.test/acme/app.git"
BARE_SERVER = """
import sys
from aiohttp import web
async def hook(request):
    await request.read()
    return web.json_response({"status": "accepted"}, status=202)
app = web.Application(client_max_size=25 * 1024 * 1024)
app.router.add_post("/hooks/github", hook)
app.router.add_get("/readyz", lambda r: web.Response(text="ready"))
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""
BARE_JETSTREAM_SERVER = """
import os, sys
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
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


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


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def bench_ingress(n: int, concurrency: int, rounds: int, report: Report) -> None:
    per = max(1, n // rounds)
    n = per * rounds
    print(
        f"== webhook ingress: {n} signed GitHub pushes, {concurrency} in flight, "
        f"{rounds} interleaved rounds"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp, EmbeddedNats(Path(tmp) / "nats") as server:
        env = {
            **os.environ,
            "NATS_URL": server.url,
            "NIPHAS_LOG_LEVEL": "WARNING",
            "NIPHAS_STATE_DIR": str(Path(tmp) / "state"),
            "NIPHAS_EVAL_WEBHOOK_SECRETS": json.dumps(
                {"acme/app": {"forge": "github", "secret": SECRET}}
            ),
        }
        sides = {
            "bare aiohttp, 202 only (floor)": [sys.executable, "-c", BARE_SERVER],
            "bare aiohttp + JetStream publish": [sys.executable, "-c", BARE_JETSTREAM_SERVER],
            "niphas eval ingress": [
                sys.executable, "-m", "niphas_common", "eval", "--role", "ingress", "--listen",
            ],
        }  # fmt: skip
        procs: dict[str, tuple[str, subprocess.Popen[bytes]]] = {}
        rates: dict[str, list[float]] = {label: [] for label in sides}
        latencies: dict[str, list[float]] = {label: [] for label in sides}
        accepted = dict.fromkeys(sides, 0)
        try:
            for label, argv in sides.items():
                port = free_port()
                full = [*argv, f"127.0.0.1:{port}"] if "--listen" in argv else [*argv, str(port)]
                url = f"http://127.0.0.1:{port}"
                procs[label] = (url, subprocess.Popen(full, env=env))
                await wait_ready(url, procs[label][1])
                # Warm-up (not counted), with other pushes: the same push is stored once.
                await load(url, min(200, n), concurrency, first=n)
            # Interleaved rounds: every side sees the same machine noise.
            for r in range(rounds):
                for label, (url, _) in procs.items():
                    rate, lat, ok = await load(url, per, concurrency, first=r * per)
                    rates[label].append(rate)
                    latencies[label].extend(lat)
                    accepted[label] += ok
        finally:
            for _, proc in procs.values():
                proc.terminate()
                proc.wait(30)
        rows = [
            (label, statistics.median(rates[label]), latencies[label], accepted[label])
            for label in sides
        ]
        bus = await Bus.connect(NatsSettings(url=server.url), name="bench", provision=False)
        info = await bus.js.stream_info("PUSH_RECEIVED")
        await bus.close()
    floor = rows[0][1]
    print(f"| {'side':<32} | {'deliveries/s':>12} | {'p50 ms':>7} | {'p99 ms':>7} | ratio |")
    print(f"|{'-' * 34}|{'-' * 14}|{'-' * 9}|{'-' * 9}|-------|")
    for label, rate, lat, answered in rows:
        assert answered == n, f"{label}: only {answered}/{n} answered 202"
        print(
            f"| {label:<32} | {rate:>12,.0f} | {pct(lat, 0.5) * 1e3:>7.1f} | "
            f"{pct(lat, 0.99) * 1e3:>7.1f} | {rate / floor:>5.2f} |"
        )
    stored = info.state.messages
    expected = n + min(200, n)
    print(f"push.received stored: {stored} (expected {expected}: every 202 was a stored event)")
    assert stored == expected
    (_, floor_rate, floor_lat, _), (_, js_rate, _, _), (_, rate, lat, _) = rows
    bare = "bare aiohttp server answering 202"
    report.row("webhook deliveries/s (signed -> push.received acked)", rate, "deliveries/s",
               baseline=floor_rate, baseline_name=bare, target=">= 0.6x",
               met=rate / floor_rate >= 0.6)  # fmt: skip
    report.row("bare aiohttp + JetStream publish acked (the stack's floor)", js_rate,
               "deliveries/s", baseline=floor_rate, baseline_name=bare)  # fmt: skip
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
    await bench_ingress(args.deliveries, args.concurrency, args.ingress_rounds, report)
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
    add_json_option(parser)
    asyncio.run(main(parser.parse_args()))
