"""The soak's summary: faults injected, events seen, builds, time to recover after each NATS
fault, the mounts made throughout and their error rate during faults, what was left mounted or
leased, and every finding."""

from __future__ import annotations

import io
from collections import Counter

from rich.console import Console
from rich.table import Table

from niphas_chaos.faults import NATS_FAULTS
from niphas_chaos.recovery import p50_max
from niphas_chaos.soak import Options, Outcome


def summary(outcome: Outcome) -> Table:
    table = Table(title="chaos soak", show_header=False, expand=False)
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_column("detail")
    retried = sum(p.attempts - 1 for p in outcome.pushes)
    table.add_row("pushes", str(len(outcome.pushes)), f"{retried} webhook re-deliveries")
    kills = Counter(f.target for f in outcome.faults if f.kind == "kill")
    by_kind = Counter(f.kind for f in outcome.faults)
    detail = ", ".join(f"{name} {n}" for name, n in sorted(kills.items()))
    table.add_row("faults injected", str(len(outcome.faults)), f"kills: {detail or 'none'}")
    servers = "1 server" if outcome.nats_servers == 1 else f"{outcome.nats_servers}-server cluster"
    nats = ", ".join(f"{kind} {by_kind[kind]}" for kind in NATS_FAULTS if by_kind[kind])
    table.add_row("", "", f"NATS ({servers}): {nats or 'no fault'}")
    _recovery_rows(table, outcome)
    _mount_rows(table, outcome)
    if outcome.leaks:
        left = ", ".join(f"{what} {n}" for what, n in outcome.leaks.items())
        table.add_row("left after the soak", str(sum(outcome.leaks.values())), left)
    for subject, n in outcome.events.items():
        table.add_row(f"events {subject}", str(n), "")
    table.add_row(
        "builds", str(outcome.builds_pushed), f"{outcome.builds_started} started (kills rerun some)"
    )
    table.add_row("quiescence", f"{outcome.quiesced_s:.0f}s", "after the last push and fault")
    table.add_row("workload web serves", "", outcome.served or "-")
    for store, verdict in outcome.verified.items():
        table.add_row(f"nix store verify: {store}", "", verdict)
    labels = {
        "loss": "losses",
        "duplicate": "duplicate builds",
        "stuck": "stuck consumers",
        "dead letter": "dead letters",
        "corrupt": "corrupt stores",
        "mount": "mount problems",
        "leak": "leaks",
    }
    for kind, label in labels.items():
        found = [f.what for f in outcome.findings if f.kind == kind]
        style = "red" if found else "green"
        shown = "\n".join(found[:10]) + (f"\n(+{len(found) - 10})" if len(found) > 10 else "")
        table.add_row(f"[{style}]{label}[/{style}]", f"[{style}]{len(found)}[/{style}]", shown)
    return table


def _recovery_rows(table: Table, outcome: Outcome) -> None:
    """Each NATS fault's recovery (p50/max) and the same run's baseline."""
    spread = p50_max(r.seconds for r in outcome.recoveries)
    if spread is not None:
        each = ", ".join(
            f"{r.seconds:.1f}s" if r.seconds is not None else "-" for r in outcome.recoveries
        )
        table.add_row(
            "recovery after NATS faults", f"p50 {spread[0]:.1f}s", f"max {spread[1]:.1f}s ({each})"
        )
    quiet = p50_max(outcome.quiet_waits)
    if quiet is not None and spread is not None:
        ratio = f"; recovery p50 {spread[0] / quiet[0]:.1f}x" if quiet[0] else ""
        table.add_row(
            "baseline: quiet moments", f"p50 {quiet[0]:.1f}s", f"max {quiet[1]:.1f}s{ratio}"
        )


def _mount_rows(table: Table, outcome: Outcome) -> None:
    """The mounts made throughout and their error rates."""
    attempts = outcome.mounts.attempts
    if attempts:
        published = sum(1 for a in attempts if a.call == "publish" and not a.error)
        unpublished = sum(1 for a in attempts if a.call == "unpublish" and not a.error)
        paths = len(outcome.mounts.store_paths)
        table.add_row(
            "mounts", str(published), f"{unpublished} unpublished, {paths} store paths moved to"
        )
        for name, rate in outcome.publish_errors.items():
            table.add_row(f"publish errors {name}", str(rate), "")
        errors = Counter(a.error.split(":", 1)[0] for a in attempts if a.error)
        if errors:
            table.add_row("", "", ", ".join(f"{c} {n}" for c, n in sorted(errors.items())))


def markdown(options: Options, outcome: Outcome) -> str:
    """The summary as a Markdown page: how the soak was run, its table, every NATS fault's
    recovery and every mount error."""
    buffer = io.StringIO()
    Console(file=buffer, width=130, no_color=True, force_terminal=False).print(summary(outcome))
    table = buffer.getvalue()
    servers = (
        "one NATS server"
        if options.nats_cluster == 1
        else (f"a {options.nats_cluster}-server JetStream cluster")
    )
    args = f"--pushes {options.pushes} --kills {options.kills}"
    args += f" --nats-restarts {options.nats_restarts} --interval-s {options.push_interval_s:g}"
    if options.nats_cluster > 1:
        args += f" --nats-cluster {options.nats_cluster} --partitions {options.partitions}"
        args += f" --partition-s {options.partition_s:g}"
    lines = [
        "# Chaos soak",
        "",
        f'`make chaos CHAOS_ARGS="{args} --seed {options.seed}"` on {servers}:',
        f"{'FAILED' if outcome.failed else 'passed'}.",
        "",
        "```",
        table.rstrip(),
        "```",
        "",
        "Recovery after each NATS fault (to the next pipeline event stored):",
        "",
        *(
            f"- {r.fault}: {f'{r.seconds:.1f}s' if r.seconds is not None else 'no event after'}"
            for r in outcome.recoveries
        ),
        "",
        "Mount errors (each resolved by a retry unless listed under mount problems):",
        "",
        *(f"- +{a.at_s:.0f}s {a.call}: {a.error}" for a in outcome.mounts.attempts if a.error),
        "",
    ]
    return "\n".join(lines)
