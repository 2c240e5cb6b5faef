"""Run every benchmark and write bench/RESULTS.md with its plots (what `make bench` does).

    .venv/bin/python bench/results.py [--run] [--out bench/out] [--results bench/RESULTS.md]

`--run` runs each `bench/bench_*.py` with `--json <out>/<name>.json`, its table shown as it
goes; a benchmark without `--json` has its printed table kept verbatim as a note instead.
Then (with or without `--run`) RESULTS.md is written from what is in `<out>`: per benchmark,
what was measured, our figure, the baseline measured in the same run, the ratio, the target
and whether it was met, plus the machine and the date, and a PNG per plot the benchmarks
recorded (e.g. the fan-out's egress and completion time against the number of nodes, as lines;
the memory per service, as bars).
Exits non-zero when a benchmark finished without results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for bench.report
from bench.report import Report, Row, Series, verdict

BENCH = Path(__file__).resolve().parent


def run_all(out: Path) -> None:
    """Run every benchmark into `out`, recording its exit code and duration in runs.json."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():
        stale.unlink()
    # What else the machine was doing when the run began (ratios hold under load; times don't).
    (out / "loadavg").write_text(" ".join(f"{x:.2f}" for x in os.getloadavg()) + "\n")
    runs = {}
    for script in sorted(BENCH.glob("bench_*.py")):
        name = script.stem.removeprefix("bench_")
        argv = [sys.executable, str(script)]
        usage = subprocess.run([*argv, "--help"], capture_output=True, text=True).stdout
        has_json = "--json" in usage
        if has_json:
            argv += ["--json", str(out / f"{name}.json")]
        print(f"== {script.relative_to(BENCH.parent)}", flush=True)
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)
        code = proc.wait()
        if not has_json:
            (out / f"{name}.txt").write_text("".join(lines))
        runs[name] = {"exit": code, "seconds": time.monotonic() - started, "json": has_json}
        print(f"-- {name}: exit {code} in {runs[name]['seconds']:.0f} s\n", flush=True)
    (out / "runs.json").write_text(json.dumps(runs, indent=2) + "\n")


def load_note(out: Path) -> str:
    """The load average when the run began, as a sentence (empty if not recorded)."""
    try:
        one, five, _ = (out / "loadavg").read_text().split()
    except (OSError, ValueError):
        return ""
    return f"Load average when the run began: {one} (1 min), {five} (5 min). "


def machine() -> str:
    cpu = "unknown CPU"
    mem_gib = 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    try:
        nix = subprocess.run(["nix", "--version"], capture_output=True, text=True).stdout.strip()
    except OSError:
        nix = "nix not installed"
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem_gib:.0f} GiB memory, Linux {platform.release()}, "
        f"{nix or 'nix unknown'}, Python {platform.python_version()}"
    )


def num(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def table(reports: list[Report]) -> list[str]:
    lines = [
        "| bench | measure | ours | baseline (same run) | ratio | target | met |",
        "|---|---|---:|---|---:|---|---|",
    ]
    for report in reports:
        for row in report.rows:
            lines.append(f"| {report.bench} | {row.measure} | {cell(row)} |")
    return lines


def cell(row: Row) -> str:
    ours = f"{num(row.ours)} {row.unit}"
    base = "-"
    if row.baseline is not None:
        base = f"{num(row.baseline)} {row.unit}"
        if row.baseline_name:
            base += f" ({row.baseline_name})"
    ratio = (
        "-"
        if row.ratio is None
        else f"{row.ratio:.2f}x"
        if row.ratio >= 0.1
        else f"{row.ratio:.2g}x"
    )
    return f"{ours} | {base} | {ratio} | {row.target or '-'} | {verdict(row.met)}"


def plot(reports: list[Report], where: Path) -> list[Path]:
    """One PNG per named plot; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str], list[Series]] = defaultdict(list)
    for report in reports:
        for series in report.series:
            groups[(report.bench, series.plot)].append(series)
    written = []
    for (bench, name), curves in sorted(groups.items()):
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
        categories = curves[0].categories
        if categories is not None:
            width = 0.8 / len(curves)
            for i, series in enumerate(curves):
                ax.bar([x + (i - (len(curves) - 1) / 2) * width for x in series.x], series.y,
                       width, label=series.label)  # fmt: skip
            ax.set_xticks(curves[0].x, categories)
            top = max(y for series in curves for y in series.y)
            ax.set_ylim(0, top * 1.45)  # room for the legend above the bars
        else:
            for series in curves:
                ax.plot(series.x, series.y, marker="o", label=series.label)
            ax.set_xscale("log", base=2)
            ax.set_xticks(curves[0].x, [f"{x:g}" for x in curves[0].x])
        ax.set_xlabel(curves[0].x_label)
        ax.set_ylabel(curves[0].y_label)
        ax.set_title(f"{bench}: {name} vs {curves[0].x_label}")
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.tight_layout()
        file = where / f"{bench}-{name.split(':')[0].replace(' ', '-')}.png"
        fig.savefig(file)
        plt.close(fig)
        written.append(file)
    return written


def render(out: Path, results: Path) -> int:
    runs: dict[str, dict[str, float]] = {}
    if (out / "runs.json").exists():
        runs = json.loads((out / "runs.json").read_text())
    reports = [Report.load(p) for p in sorted(out.glob("*.json")) if p.name != "runs.json"]
    for text in sorted(out.glob("*.txt")):
        verbatim = Report(text.stem, f"{text.stem} (printed table, no --json)")
        verbatim.note("```\n" + text.read_text().rstrip() + "\n```")
        reports.append(verbatim)
    pngs = plot(reports, results.parent)
    missing = [name for name, run in runs.items() if run["json"] and not (out / f"{name}.json")
               .exists()]  # fmt: skip
    lines = [
        "# Benchmark results",
        "",
        f"Written by `make bench` (`bench/results.py`) on "
        f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}.",
        "",
        f"Machine: {machine()}. {load_note(out)}Every baseline was measured in the same run on "
        "the same cores, so ratios are the figures to read; absolute times move with the load.",
        "",
        "## Summary",
        "",
        *table(reports),
        "",
    ]
    if missing:
        lines += [f"Finished without results: {', '.join(missing)}.", ""]
    for png in pngs:
        lines += [f"![{png.stem}]({png.name})", ""]
    for report in reports:
        lines += [f"## {report.bench}: {report.title}", ""]
        run = runs.get(report.bench)
        if run is not None:
            lines += [f"Ran in {run['seconds']:.0f} s, exit status {run['exit']:.0f}.", ""]
        for note in report.notes:
            lines += [note, ""]
    results.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {results} and {len(pngs)} plot(s)")
    return 1 if missing else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="store_true", help="run the benchmarks first")
    parser.add_argument("--out", type=Path, default=BENCH / "out")
    parser.add_argument("--results", type=Path, default=BENCH / "RESULTS.md")
    args = parser.parse_args()
    if args.run:
        run_all(args.out)
    return render(args.out, args.results)


if __name__ == "__main__":
    sys.exit(main())
