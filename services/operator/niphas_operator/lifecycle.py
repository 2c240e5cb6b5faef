"""A workload's phase, and the reason a user needs to act on it, from its conditions.

    Evaluating    push.received published, no eval.done for it yet
    Building      evaluated; waiting for build.done
    Provisioning  its Deployment(s) run the path, pods not all available yet
    Running       every replica available
    Degraded      it runs, but something is wrong: a newer evaluation or build failed (the
                  last good path keeps running), replicas became unavailable, no node has one
                  of its architectures, or the operator may not write its children
    Failed        nothing runs and nothing will without a change: the evaluation or build
                  failed, or the spec is invalid

`status.reason` is a CamelCase word (`kubectl get nw` prints it), `status.message` the
sentence behind it. Phases Pending and Progressing are those of earlier operators.
"""

from __future__ import annotations

from typing import Any

from niphas_operator.status import StatusBuilder
from niphas_operator.workload import Workload

Lifecycle = tuple[str, str, str]
"""(phase, reason, message)."""


def lifecycle(workload: Workload, status: StatusBuilder, *, running: bool) -> Lifecycle:
    """`running`: the workload has a store path its Deployment(s) run."""
    conditions = {c["type"]: c for c in status.conditions()}

    def holds(type_: str, value: str) -> dict[str, Any] | None:
        condition = conditions.get(type_)
        return condition if condition is not None and condition["status"] == value else None

    if invalid := holds("Valid", "False"):
        return _from("Failed", invalid)
    if forbidden := holds("Ready", "False"):
        return _from("Degraded", forbidden)
    if not running:
        for type_ in ("Evaluated", "Built"):
            if failed := holds(type_, "False"):
                return _from("Failed", failed)
        if evaluated := holds("Evaluated", "True"):
            return ("Building", "Evaluated", f"{_message(evaluated)}; waiting for build.done")
        return (
            "Evaluating",
            "EvaluationRequested",
            f"waiting for the evaluation of {workload.spec.flake_ref}#{workload.spec.attribute}",
        )
    if degraded := holds("Degraded", "True"):
        return _from("Degraded", degraded)
    if unschedulable := holds("Schedulable", "False"):
        return _from("Degraded", unschedulable)
    available = conditions.get("Available") or {}
    if available.get("status") == "True":
        return _from("Running", available)
    rolling = holds("Progressing", "True")
    if rolling is None and workload.status.phase in ("Running", "Degraded"):
        return _from("Degraded", available or {"reason": "ReplicasUnavailable"})
    return _from("Provisioning", rolling or available or {"reason": "WaitingForPods"})


def _from(phase: str, condition: dict[str, Any]) -> Lifecycle:
    return (phase, str(condition.get("reason") or phase), _message(condition))


def _message(condition: dict[str, Any]) -> str:
    return str(condition.get("message") or condition.get("reason") or "")
