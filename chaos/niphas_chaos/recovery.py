"""How fast the pipeline moved again after each NATS fault, and how often a mount failed while
a fault was on, as pure functions over what the soak recorded (so each can be checked on
crafted input).

Recovery after a NATS fault = from the fault's start to the next pipeline event JetStream
stored (`push.received`, `eval.done` or `build.done`, whichever comes first): a service got
its input and published its answer. Pushes arrive every few seconds, so it is an upper bound:
an idle pipeline would look slow to recover. So the same wait is measured from quiet moments
(every second of the pushing phase at least `QUIET_AFTER_S` past any fault's end) as the
baseline of the same run: the recovery's excess over it is the stall the fault caused."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from niphas_chaos.faults import NATS_FAULTS, Fault
from niphas_chaos.mounting import Attempt

QUIET_AFTER_S = 10.0


@dataclass(frozen=True)
class Recovery:
    fault: str
    """`<kind> <target>` at `+<s>`."""
    seconds: float | None
    """None: no event after it (the fault came after the last one)."""


def recoveries(faults: Iterable[Fault], event_times: Sequence[float]) -> list[Recovery]:
    """For each NATS fault, the seconds to the first event stored after it (Unix times)."""
    times = sorted(event_times)
    out = []
    for fault in faults:
        if fault.kind not in NATS_FAULTS:
            continue
        label = f"{fault.kind} {fault.target} at +{fault.at_s:.0f}s"
        out.append(Recovery(label, next_event(times, fault.at_wall)))
    return out


def next_event(times: Sequence[float], moment: float) -> float | None:
    """Seconds from `moment` to the first of the sorted `times` after it."""
    return next((t - moment for t in times if t > moment), None)


def quiet_waits(
    faults: Sequence[Fault], event_times: Sequence[float], start: float, end: float
) -> list[float]:
    """The wait for the next event from each quiet second between `start` and `end` (Unix
    times): the baseline for `recoveries`."""
    times = sorted(event_times)
    windows = [
        (f.at_wall, f.at_wall + ((f.ended_s or f.at_s) - f.at_s) + QUIET_AFTER_S) for f in faults
    ]
    waits = []
    moment = start
    while moment < end:
        if not any(lo - 1.0 <= moment <= hi for lo, hi in windows):
            wait = next_event(times, moment)
            if wait is not None:
                waits.append(wait)
        moment += 1.0
    return waits


def p50_max(values: Iterable[float | None]) -> tuple[float, float] | None:
    known = [v for v in values if v is not None]
    return (statistics.median(known), max(known)) if known else None


def during(attempt: Attempt, faults: Iterable[Fault]) -> bool:
    """Whether the call overlapped a fault (from its start to its end, or just its start
    when its end was not seen)."""
    for fault in faults:
        end = fault.ended_s if fault.ended_s is not None else fault.at_s
        if attempt.at_s <= end and attempt.ended_s >= fault.at_s:
            return True
    return False


@dataclass(frozen=True)
class ErrorRate:
    failed: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.failed / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"{self.failed}/{self.total} ({self.percent:.0f}%)"


def publish_errors(attempts: Iterable[Attempt], faults: Sequence[Fault]) -> dict[str, ErrorRate]:
    """Failed publishes among those made during a fault (any kind, and NATS faults alone)
    and outside every fault."""
    nats = [f for f in faults if f.kind in NATS_FAULTS]
    groups: dict[str, list[Attempt]] = {
        "during faults": [],
        "during NATS faults": [],
        "outside": [],
    }
    for attempt in attempts:
        if attempt.call != "publish":
            continue
        if during(attempt, faults):
            groups["during faults"].append(attempt)
            if during(attempt, nats):
                groups["during NATS faults"].append(attempt)
        else:
            groups["outside"].append(attempt)
    return {
        name: ErrorRate(sum(1 for a in group if a.error), len(group))
        for name, group in groups.items()
    }
