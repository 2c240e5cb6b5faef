"""Building a workload's status: conditions that keep their transition time, and history.

Status is written through the status subresource as a merge patch of the fields computed
here; a patch equal to what is stored is not sent at all, so a resync or a restarted
operator writes nothing when nothing changed.
"""

from __future__ import annotations

from typing import Any

from niphas_operator.workload import HistoryEntry, Workload, now_rfc3339, short_store_path


class StatusBuilder:
    """Accumulates the status a reconcile wants, starting from the stored one."""

    def __init__(self, workload: Workload) -> None:
        self._workload = workload
        raw = workload.obj.get("status") or {}
        self._stored: dict[str, Any] = raw
        self.fields: dict[str, Any] = {}
        self._conditions: dict[str, dict[str, Any]] = {
            c["type"]: dict(c) for c in raw.get("conditions") or [] if "type" in c
        }

    def set(self, **fields: Any) -> None:
        self.fields.update(fields)

    def condition(self, type_: str, status: bool | None, reason: str, message: str = "") -> None:
        value = "Unknown" if status is None else ("True" if status else "False")
        old = self._conditions.get(type_)
        changed = old is None or old.get("status") != value
        condition = {
            "type": type_,
            "status": value,
            "reason": reason,
            "lastTransitionTime": now_rfc3339()
            if changed
            else old.get("lastTransitionTime", now_rfc3339()),  # type: ignore[union-attr]
            "observedGeneration": self._workload.generation,
        }
        if message:
            # An empty string would be stored as null, which the schema rejects.
            condition["message"] = message[:1024]
        self._conditions[type_] = condition

    def current(self, type_: str, generation: int) -> bool:
        """Whether condition `type_` was set for this generation (or a later one)."""
        observed = self._conditions.get(type_, {}).get("observedGeneration")
        return isinstance(observed, int) and observed >= generation

    def clear(self, type_: str) -> None:
        """Remove the condition `type_` (when it no longer applies at all)."""
        self._conditions.pop(type_, None)

    def conditions(self) -> list[dict[str, Any]]:
        return sorted(self._conditions.values(), key=lambda c: str(c["type"]))

    def patch(self) -> dict[str, Any] | None:
        """The status merge patch, or None when it would change nothing."""
        desired = {**self.fields, "conditions": self.conditions()}
        if all(self._stored.get(k) == _merged(v) for k, v in desired.items()):
            return None
        return {"status": desired}


def _merged(value: Any) -> Any:
    """What a merge patch of `value` leaves stored: None removes a key of an object."""
    if isinstance(value, dict):
        return {k: _merged(v) for k, v in value.items() if v is not None}
    return value


def moved_to(
    workload: Workload,
    store_path: str,
    commit: str | None,
    main_program: str | None,
    *,
    record: bool = True,
) -> dict[str, Any]:
    """Status fields for a workload that now runs `store_path`: the path itself plus, with
    `record`, a history entry (newest first, trimmed to spec.historyLimit). Moving to the
    path it already runs adds nothing; a rollback (`record=False`) reuses its entry."""
    history = list(workload.status.history)
    if not record or (history and history[0].store_path == store_path):
        entries = history
    else:
        revision = max((h.revision for h in history), default=0) + 1
        entry = HistoryEntry(
            revision=revision,
            store_path=store_path,
            commit=commit,
            main_program=main_program,
            time=now_rfc3339(),
        )
        entries = [entry, *history][: workload.spec.history_limit]
    fields: dict[str, Any] = {
        "storePath": store_path,
        "shortStorePath": short_store_path(store_path),
        "history": [h.model_dump(by_alias=True, exclude_none=True) for h in entries],
    }
    if commit is not None:
        fields["commit"] = commit
    if main_program is not None:
        fields["mainProgram"] = main_program
    return fields


def history_entry(workload: Workload, store_path: str) -> HistoryEntry | None:
    for entry in workload.status.history:
        if entry.store_path == store_path:
            return entry
    return None
