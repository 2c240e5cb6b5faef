"""Builder benchmark, against an embedded nats-server and the real nix, in one run:

1. everything cached: eval.done -> build.done latency per derivation (p50/p99), one event at a
   time, beside the bare cache check a script would do (`nix path-info --store <cache>`);
2. an uncached trivial derivation: the builder's eval.done -> build.done vs bare
   `nix-store --realise` + `nix copy --to file://...` of an equivalent fresh derivation,
   alternating, medians. Target ratio <= 1.5.

    .venv/bin/python bench/bench_builder.py [--cached 200] [--uncached 5]

Derivations are tiny busybox builds (no nixpkgs offline); everything lives in a temp dir and
the outputs are deleted from the store afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from niphas_builder.app import wired
from niphas_builder.settings import BuilderSettings
from niphas_common.bus.bus import Bus
from niphas_common.nats_server import EmbeddedNats
from niphas_common.nix.runner import NixRunner
from niphas_common.nix.signing import SecretKey
from niphas_common.settings import NatsSettings
from niphas_schemas import BuildDone, EvalDone, EvaluatedAttribute

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for bench.report
from bench.report import Report, add_json_option
from niphas_demo.sample import nix_system

REPO = "https://forge.example/bench.git"


def instantiate(runner: NixRunner, tools: str, seed: str) -> tuple[str, str]:
    """A fresh trivial derivation: (drv path, output path)."""
    bb = f"${{builtins.storePath {tools}}}/bin/busybox"
    system = nix_system()
    expr = (
        f'let d = derivation {{ name = "bench-{seed}"; system = "{system}"; builder = "{bb}"; '
        f'args = [ "sh" "-c" "{bb} mkdir $out && echo {seed} > $out/seed" ]; }}; '
        "in { drv = d.drvPath; out = d.outPath; }"
    )
    out = runner.run("nix", "eval", "--json", "--impure", "--expr", expr).json()
    return out["drv"], out["out"]


def eval_done(drv: str, out: str, n: int) -> EvalDone:
    attr = EvaluatedAttribute(
        attribute="default",
        attr_path=f"packages.{nix_system()}.default",
        system=nix_system(),
        drv_path=drv,
        outputs={"out": out},
    )
    commit = uuid.uuid4().hex + f"{n:08x}"
    return EvalDone(
        push_event_id=f"bench-{n}",
        repository=REPO,
        commit=commit[:40],
        status="succeeded",
        attributes=(attr,),
    )


class Waiter:
    """Resolves when the build.done answering an eval.done arrives (core NATS subscription)."""

    def __init__(self) -> None:
        self.pending: dict[str, asyncio.Future[BuildDone]] = {}

    async def on_msg(self, msg: object) -> None:
        done = BuildDone.model_validate_json(msg.data)  # type: ignore[attr-defined]
        fut = self.pending.pop(done.eval_event_id, None)
        if fut is not None and not fut.done():
            fut.set_result(done)

    async def roundtrip(self, bus: Bus, event: EvalDone) -> tuple[float, BuildDone]:
        fut = asyncio.get_running_loop().create_future()
        self.pending[event.event_id] = fut
        started = time.perf_counter()
        await bus.publish(event)
        done = await asyncio.wait_for(fut, 120)
        return time.perf_counter() - started, done


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure_cached(
    args: argparse.Namespace,
    ctx: tuple[NixRunner, Bus, Waiter, str, str],
    lease_ttl_s: float,
    created: list[str],
) -> tuple[list[float], list[float]]:
    """Round trips of an already cached derivation, and the bare cache check beside them."""
    runner, bus, waiter, tools, push_url = ctx
    drv, out = instantiate(runner, tools, f"cached-{uuid.uuid4().hex[:8]}")
    created += [out, drv]
    _, first = await waiter.roundtrip(bus, eval_done(drv, out, 0))
    assert first.status == "built", first.log_tail
    await asyncio.sleep(lease_ttl_s)  # wait until only the cache knows it
    cached = []
    for n in range(1, args.cached + 1):
        took, done = await waiter.roundtrip(bus, eval_done(drv, out, n))
        assert done.status in ("cached", "built"), done.log_tail
        cached.append(took)
    check = []
    for _ in range(min(args.cached, 30)):
        started = time.perf_counter()
        runner.run("nix", "path-info", "--store", push_url, out)
        check.append(time.perf_counter() - started)
    return cached, check


async def measure_uncached(
    args: argparse.Namespace,
    ctx: tuple[NixRunner, Bus, Waiter, str, str],
    work: Path,
    created: list[str],
) -> tuple[list[float], list[float]]:
    """Fresh derivations: the builder's round trip vs bare nix, alternating."""
    runner, bus, waiter, tools, _ = ctx
    ours, bare = [], []
    bare_cache = f"file://{work / 'bare-cache'}?compression=zstd&secret-key={work / 'key.sec'}"
    for n in range(args.uncached):
        drv, out = instantiate(runner, tools, f"ours-{n}-{uuid.uuid4().hex[:8]}")
        created += [out, drv]
        took, done = await waiter.roundtrip(bus, eval_done(drv, out, 10_000 + n))
        assert done.status == "built", done.log_tail
        ours.append(took)
        drv, out = instantiate(runner, tools, f"bare-{n}-{uuid.uuid4().hex[:8]}")
        created += [out, drv]
        started = time.perf_counter()
        await runner.arun("nix-store", "--realise", drv)
        await runner.arun("nix", "copy", "--to", bare_cache, out)
        bare.append(time.perf_counter() - started)
    return ours, bare


def prepare_tools(runner: NixRunner, work: Path) -> str:
    """Busybox as a store path (the builder of every benchmark derivation), rooted in `work`."""
    tools_src = work / "tools" / "bin"
    tools_src.mkdir(parents=True)
    shutil.copy2("/bin/busybox", tools_src / "busybox")
    tools = str(runner.add_to_store(work / "tools"))
    runner.add_root(tools, work / "tools-root")
    return tools


async def run(args: argparse.Namespace, work: Path) -> None:
    runner = NixRunner()
    tools = prepare_tools(runner, work)
    key = SecretKey.generate("bench-1")
    (work / "key.sec").write_text(str(key))
    created: list[str] = []

    server = EmbeddedNats(work / "nats")
    server.start()
    bus = await Bus.connect(NatsSettings(url=server.url), name="bench")
    settings = BuilderSettings(
        state_dir=work / "state",
        name="bench",
        cache_url=f"file://{work / 'cache'}",
        secret_key_file=work / "key.sec",
        supersede=False,
    )
    waiter = Waiter()
    sub = await bus.nc.subscribe(BuildDone.subject, cb=waiter.on_msg)
    stop = asyncio.Event()
    ctx = (runner, bus, waiter, tools, settings.push_url)
    try:
        async with wired(bus, settings) as builder:
            serving = asyncio.create_task(
                bus.serve([builder.subscription()], stop, fetch_timeout_s=0.2)
            )
            cached, check = await measure_cached(args, ctx, settings.lease_ttl_s, created)
            ours, bare = await measure_uncached(args, ctx, work, created)
            stop.set()
            await serving
    finally:
        await sub.unsubscribe()
        await bus.close()
        server.stop()
        for path in created:
            runner.delete([path], check=False)
    show(args, cached, check, ours, bare)


def show(
    args: argparse.Namespace,
    cached: list[float],
    check: list[float],
    ours: list[float],
    bare: list[float],
) -> None:
    """The table on stdout and the JSON report."""
    rows = [
        ("cached eval.done->build.done p50 (ms)", pct(cached, 0.5), statistics.median(check), None),
        ("cached eval.done->build.done p99 (ms)", pct(cached, 0.99), pct(check, 0.99), None),
        ("uncached build+push median (ms)", statistics.median(ours), statistics.median(bare), 1.5),
    ]
    print(f"{'measure':<40} {'builder':>10} {'baseline':>10} {'ratio':>7} {'target':>8}")
    for name, value, base, target in rows:
        ratio = value / base
        goal = f"<= {target}" if target else "-"
        print(f"{name:<40} {value * 1000:>10.1f} {base * 1000:>10.1f} {ratio:>7.2f} {goal:>8}")
    print(
        "baselines: `nix path-info --store file://cache PATH` (cached rows); "
        "`nix-store --realise` + `nix copy --to file://...?compression=zstd` (uncached row)"
    )
    report = Report("builder", "Builder: per-derivation overhead, cached and uncached")
    check_name = "nix path-info --store file://<cache> PATH"
    for name, value, base, target in rows:
        report.row(name.rsplit(" (", 1)[0], value * 1000, "ms", baseline=base * 1000,
                   baseline_name=check_name if target is None else
                   "nix-store --realise + nix copy --to file://...?compression=zstd",
                   target=f"<= {target}x" if target else None,
                   met=value / base <= target if target else None)  # fmt: skip
    report.note(f"{args.cached} cached derivations one at a time; {args.uncached} uncached "
                "rounds alternating with the bare commands")  # fmt: skip
    report.write(args.json)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cached", type=int, default=200, help="cached derivations to time")
    parser.add_argument("--uncached", type=int, default=5, help="uncached rounds")
    add_json_option(parser)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="niphas-bench-builder-") as tmp,
        contextlib.suppress(KeyboardInterrupt),
    ):
        asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    main()
