"""The invariants a soak must keep, as pure functions over what it read back: the events the
streams stored, the builder's log lines, the consumers' state. Each returns findings (empty when
the invariant holds), so each can be shown failing on crafted input.

- every push has a succeeded `eval.done`, and every derivation it names a `build.done` with
  status `built` or `cached` for that commit (else: a loss);
- no derivation is built twice: one `push done` per derivation in the builder's log, one
  `build.done` status `built` per (commit, derivation) (a `cached` re-announcement after a
  redelivery is fine);
- no durable consumer holds pending or unacknowledged messages;
- nothing was dead-lettered.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

PUSH_DONE = re.compile(r"push done: (/\S+\.drv)")
BUILD_STARTED = re.compile(r"build started: (/\S+\.drv)")


@dataclass(frozen=True)
class Finding:
    kind: str
    """`loss`, `duplicate`, `stuck` or `dead letter`."""
    what: str


@dataclass(frozen=True)
class ConsumerState:
    stream: str
    durable: str
    num_pending: int
    num_ack_pending: int


def builds_per_push(
    commits: Iterable[str], eval_done: list[dict[str, Any]], build_done: list[dict[str, Any]]
) -> tuple[list[Finding], dict[str, dict[str, str]]]:
    """Losses and duplicate `built` answers per pushed commit; also, per commit, each
    derivation's output path (the app's store path) for the workload check."""
    findings: list[Finding] = []
    outputs: dict[str, dict[str, str]] = {}
    for commit in commits:
        short = commit[:12]
        evals = [e for e in eval_done if e.get("commit") == commit]
        if not any(e.get("status") == "succeeded" for e in evals):
            reasons = "; ".join(str(e.get("error")) for e in evals) or "no eval.done"
            findings.append(Finding("loss", f"push {short}: not evaluated ({reasons})"))
            continue
        drvs = {
            a["drv_path"]
            for e in evals
            if e.get("status") == "succeeded"
            for a in e.get("attributes") or []
            if a.get("drv_path")
        }
        answers = [b for b in build_done if b.get("commit") == commit]
        outputs[commit] = {}
        for drv in sorted(drvs):
            mine = [b for b in answers if b.get("drv_path") == drv]
            ok = [b for b in mine if b.get("status") in ("built", "cached")]
            built = [b for b in mine if b.get("status") == "built"]
            name = drv.rsplit("/", 1)[-1]
            if not ok:
                got = ", ".join(sorted({str(b.get("status")) for b in mine})) or "nothing"
                findings.append(Finding("loss", f"push {short}: {name} has no build ({got})"))
                continue
            if len(built) > 1:
                findings.append(
                    Finding("duplicate", f"push {short}: {name} built {len(built)} times")
                )
            paths = [o.get("path", "") for o in ok[-1].get("outputs") or []]
            outputs[commit][drv] = paths[0] if paths else ""
    return findings, outputs


def builds_in_log(lines: Iterable[str]) -> tuple[list[Finding], Counter[str], Counter[str]]:
    """Derivations the builder pushed more than once (a finished build repeated), and the
    counts of builds started and pushed per derivation. A build started twice but pushed once
    is a build interrupted by a kill: its rerun is expected."""
    started: Counter[str] = Counter()
    pushed: Counter[str] = Counter()
    for line in lines:
        if match := PUSH_DONE.search(line):
            pushed[match[1]] += 1
        elif match := BUILD_STARTED.search(line):
            started[match[1]] += 1
    findings = [
        Finding("duplicate", f"{drv.rsplit('/', 1)[-1]} was built and pushed {n} times")
        for drv, n in sorted(pushed.items())
        if n > 1
    ]
    return findings, started, pushed


def stuck_consumers(consumers: Iterable[ConsumerState]) -> list[Finding]:
    return [
        Finding(
            "stuck",
            f"{c.stream}/{c.durable}: {c.num_pending} pending, {c.num_ack_pending} unacked",
        )
        for c in consumers
        if c.num_pending or c.num_ack_pending
    ]


def dead_letters(subjects: Iterable[str]) -> list[Finding]:
    counts = Counter(subjects)
    return [Finding("dead letter", f"{n} on {s}") for s, n in sorted(counts.items())]
