"""Which commit statuses each event means, one context per stage.

- `push.received` (with a commit): `<prefix>/eval` pending.
- `eval.done`: `<prefix>/eval` success or failure (the error's first line); each attribute
  `<prefix>/build/<attr>` pending, or failure when the attribute did not evaluate.
- `build.done`: `<prefix>/build/<attr>` success (built or cached), failure linking its log, or
  cancelled when a newer push of the ref superseded it.
- `workload.status` (the operator): `<prefix>/deploy/<namespace>/<name>` pending while the
  commit's rollout provisions, success once Running, failure when Degraded or Failed, with the
  reason as description, linking the commit's build logs. A workload Degraded because a newer
  evaluation or build failed still runs this commit as it did: nothing is posted (the newer
  commit's own statuses say it failed).
"""

from __future__ import annotations

from collections.abc import Callable

from niphas_schemas import BuildDone, EvalDone, PushReceived, WorkloadRolled

from .forges import CommitStatus, State

SUPERSEDED = "superseded by "
"""How the builder's log tail starts when a newer push of the ref made the build pointless."""

LogUrl = Callable[[str], str]
"""A derivation path -> the URL of its build log (or a commit -> the logs of its builds)."""

NEWER_FAILED = ("EvaluationFailed", "BuildFailed")
"""Reasons a workload is Degraded that are about a newer commit, not the one it runs."""
_ROLLOUT_STATES: dict[str, State] = {
    "Provisioning": "pending",
    "Running": "success",
    "Degraded": "failure",
    "Failed": "failure",
}


def _first_line(text: str | None, default: str) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()
    return default


def drv_hash(drv_path: str) -> str:
    return drv_path.rsplit("/", 1)[-1].split("-", 1)[0]


class Statuses:
    def __init__(self, prefix: str, log_url: LogUrl, push_logs_url: LogUrl | None = None) -> None:
        self.prefix = prefix
        self.log_url = log_url
        self.push_logs_url = push_logs_url

    @property
    def eval_context(self) -> str:
        return f"{self.prefix}/eval"

    def build_context(self, attribute: str) -> str:
        return f"{self.prefix}/build/{attribute}"

    def deploy_context(self, namespace: str, name: str) -> str:
        return f"{self.prefix}/deploy/{namespace}/{name}"

    def for_push(self, event: PushReceived) -> list[CommitStatus]:
        if event.commit is None:
            return []  # the commit is known once evaluated
        return [
            CommitStatus(
                event.repository,
                event.commit,
                self.eval_context,
                "pending",
                "evaluating the flake",
                ref=event.ref,
            )
        ]

    def for_eval(self, event: EvalDone) -> list[CommitStatus]:
        def status(context: str, state: State, text: str) -> CommitStatus:
            return CommitStatus(
                event.repository,
                event.commit,
                context,
                state,
                text,
                ref=event.ref,
            )

        if event.status == "failed":
            reason = _first_line(event.error, "evaluation failed")
            return [status(self.eval_context, "failure", f"evaluation failed: {reason}")]
        found = [
            status(self.eval_context, "success", f"evaluated {len(event.attributes)} attributes")
        ]
        for attr in event.attributes:
            context = self.build_context(attr.attribute)
            if attr.error is not None:
                reason = _first_line(attr.error, "did not evaluate")
                found.append(status(context, "failure", f"not evaluated: {reason}"))
            else:
                found.append(status(context, "pending", "waiting for its build"))
        return found

    def for_build(self, event: BuildDone) -> list[CommitStatus]:
        url = self.log_url(event.drv_path)
        context = self.build_context(event.attribute)
        tail = event.log_tail or ""
        state: State
        if event.status == "failed" and tail.startswith(SUPERSEDED):
            newer = tail.removeprefix(SUPERSEDED).split()[0][:12]
            state, text = "cancelled", f"cancelled: superseded by {newer}"
        elif event.status == "failed":
            state, text = "failure", "build failed: see the log"
        elif event.status == "cached":
            state, text = "success", "already built (cached)"
        else:
            state, text = "success", f"built in {event.duration_s:.0f} s"
        return [
            CommitStatus(
                event.repository,
                event.commit,
                context,
                state,
                text,
                target_url=url,
                ref=event.ref,
            )
        ]

    def for_rollout(self, event: WorkloadRolled) -> list[CommitStatus]:
        if event.phase == "Degraded" and event.reason in NEWER_FAILED:
            return []
        state = _ROLLOUT_STATES[event.phase]
        where = f"{event.namespace}/{event.name}"
        text = f"{where}: {event.reason}"
        if event.phase == "Provisioning":
            text = f"{where} rolling out: {event.reason}"
        elif event.phase == "Running":
            text = f"{where} running"
        return [
            CommitStatus(
                event.repository,
                event.commit,
                self.deploy_context(event.namespace, event.name),
                state,
                text,
                target_url=self.push_logs_url(event.commit) if self.push_logs_url else None,
                ref=event.ref,
            )
        ]
