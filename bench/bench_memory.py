"""Memory per service: each service's resident memory idle and its peak under the demo's load.

    .venv/bin/python bench/bench_memory.py [--pushes 2] [--settle-s 3] [--json PATH]

The services run as `niphas up` runs them on one machine, configured as the demo configures
them (demo/niphas_demo: eval ingress and workers, builder, operator, csi, mesh, reporter, an
embedded NATS). Idle: `--settle-s` after every service answered /readyz, each service's
VmRSS from /proc (its process and every process below it, e.g. eval workers, summed). Under
load: after `--pushes` pushes of the demo's sample app (webhook -> evaluation -> build ->
Deployment rendered), each service's VmHWM (the peak resident set of each of its processes,
summed: an upper bound of the tree's peak). The mesh agents under the fan-out are measured by
bench_netmodel.py (target <= 150 MB per agent).
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from importlib.metadata import entry_points
from pathlib import Path

from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for bench.*
from bench.proc_status import status_kb
from bench.report import Report, Series, add_json_option
from niphas_demo.flow import Demo
from niphas_demo.stack import Stack, child_pids


def import_floor_mb(service: str) -> float:
    """RSS in MB of a bare interpreter that imported the service's app module (its
    `niphas.services` entry point) and nothing else: what its code costs before it runs."""
    (entry,) = entry_points(group="niphas.services", name=service.split()[0])
    module = entry.value.split(":", 1)[0]
    probe = (
        f"import {module}, re; print(re.search(r'VmRSS:\\s+(\\d+)', "
        "open('/proc/self/status').read()).group(1))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return int(out.stdout) / 1024


def tree(pid: int) -> list[int]:
    """`pid` and every process below it."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo += child_pids(current)
    return found


def service_pids(stack: Stack) -> dict[str, int]:
    """The processes `niphas up` started, by service (`python -m niphas_common <service>
    [--role <role> ...]`: named `<service> <role>` when it has a role)."""
    if stack.process is None:
        return {}
    found = {}
    for pid in child_pids(stack.process.pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        except OSError:
            continue  # gone meanwhile
        if "niphas_common" in argv[:-2]:
            name = argv[argv.index("niphas_common") + 1]
            if "--role" in argv[:-2]:
                name += " " + argv[argv.index("--role") + 1]
            found[name] = pid
    return dict(sorted(found.items()))


def service_mb(stack: Stack, field: str) -> dict[str, float]:
    """Per service, `field` summed over its process tree, in MB (2^20 bytes)."""
    return {
        name: sum(status_kb(p, field) for p in tree(pid)) / 1024
        for name, pid in service_pids(stack).items()
    }


async def measure(state: Path, pushes: int, settle_s: float) -> tuple[dict[str, float], ...]:
    """(idle VmRSS, VmHWM after the pushes, process counts) per service."""
    demo = Demo(state, Console(quiet=True))
    try:
        env = demo.prepare()
        await demo.start(env)
        assert demo.stack is not None
        await asyncio.sleep(settle_s)
        idle = service_mb(demo.stack, "VmRSS")
        started = time.perf_counter()
        for i in range(pushes):
            result = await demo.push(f"v{i + 1}")
            await demo.rendered(result.store_path)
        print(f"{pushes} pushes built and rendered in {time.perf_counter() - started:.1f} s")
        peak = service_mb(demo.stack, "VmHWM")
        procs = {n: float(len(tree(p))) for n, p in service_pids(demo.stack).items()}
        return idle, peak, procs
    finally:
        await demo.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pushes", type=int, default=2, help="demo pushes for the load")
    parser.add_argument(
        "--settle-s", type=float, default=3.0, help="seconds idle after ready before measuring"
    )
    add_json_option(parser)
    args = parser.parse_args()
    if args.pushes < 1 or args.settle_s < 0:
        parser.error("--pushes must be >= 1 and --settle-s >= 0")
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        idle, peak, procs = asyncio.run(measure(Path(tmp), args.pushes, args.settle_s))
    report = Report("memory", "Resident memory per service, idle and under the demo's load")
    floors = {name: import_floor_mb(name) for name in idle}
    print(f"| {'service':<10} | {'processes':>9} | {'imports':>9} | {'idle RSS':>9} | "
          f"{'peak RSS':>9} |")  # fmt: skip
    print(f"|{'-' * 12}|{'-' * 11}|{'-' * 11}|{'-' * 11}|{'-' * 11}|")
    for name in idle:
        print(f"| {name:<10} | {procs.get(name, 0):>9.0f} | {floors[name]:>6.1f} MB | "
              f"{idle[name]:>6.1f} MB | {peak.get(name, 0):>6.1f} MB |")  # fmt: skip
        report.row(f"{name}: RSS idle", idle[name], "MB", baseline=floors[name],
                   baseline_name="its app module imported, nothing running")  # fmt: skip
        report.row(f"{name}: peak RSS, {args.pushes} demo pushes", peak.get(name, 0.0), "MB",
                   baseline=idle[name], baseline_name="idle")  # fmt: skip
    names = list(idle)
    xs = [float(i) for i in range(len(names))]
    for label, values in (("idle", idle), (f"peak, {args.pushes} pushes", peak),
                          ("app module imported", floors)):  # fmt: skip
        ys = [values.get(n, 0.0) for n in names]
        report.series.append(Series("resident memory", label, xs, ys, "service", "RSS (MB)", names))
    report.note(
        f"Idle: VmRSS {args.settle_s:g} s after every service was ready, summed over each "
        f"service's processes; under load: VmHWM after {args.pushes} pushes of the demo's app "
        "(evaluated, built, rendered), summed over its processes (an upper bound of the peak). "
        "Processes per service: "
        + ", ".join(f"{n} {c:.0f}" for n, c in sorted(procs.items()))
        + ". The mesh agents' peak under a fan-out is in the netmodel benchmark."
    )
    report.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
