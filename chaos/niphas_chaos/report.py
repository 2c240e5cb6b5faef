"""The soak's summary: faults injected, events seen, builds, and every finding."""

from __future__ import annotations

from collections import Counter

from rich.table import Table

from niphas_chaos.soak import Outcome


def summary(outcome: Outcome) -> Table:
    table = Table(title="chaos soak", show_header=False, expand=False)
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_column("detail")
    retried = sum(p.attempts - 1 for p in outcome.pushes)
    table.add_row("pushes", str(len(outcome.pushes)), f"{retried} webhook re-deliveries")
    kills = Counter(f.target for f in outcome.faults if f.kind == "kill")
    restarts = sum(1 for f in outcome.faults if f.kind == "nats restart")
    detail = ", ".join(f"{name} {n}" for name, n in sorted(kills.items()))
    table.add_row("faults injected", str(len(outcome.faults)), f"kills: {detail or 'none'}")
    table.add_row("", "", f"NATS restarts: {restarts}")
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
    }
    for kind, label in labels.items():
        found = [f.what for f in outcome.findings if f.kind == kind]
        style = "red" if found else "green"
        shown = "\n".join(found[:10]) + (f"\n(+{len(found) - 10})" if len(found) > 10 else "")
        table.add_row(f"[{style}]{label}[/{style}]", f"[{style}]{len(found)}[/{style}]", shown)
    return table
