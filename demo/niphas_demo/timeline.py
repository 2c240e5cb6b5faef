"""The timeline of one push: every event its trace produced, read back from the streams.

Events of one push share the trace id in their `traceparent` header (the services carry it
from the webhook to the mount), so the timeline is a filter over what JetStream stored, not a
log the demo kept: it shows what really happened on the bus.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from nats.js import JetStreamContext

from niphas_common.bus.inspect import StoredMessage, view

SUBJECTS = ("push.received", "eval.done", "build.done", "path.wanted", "path.available")
_SCAN = 200
"""Messages read back per subject: far more than one push produces."""


def trace_id(headers: dict[str, str]) -> str | None:
    parts = headers.get("traceparent", "").split("-")
    return parts[1] if len(parts) == 4 else None


@dataclass(frozen=True)
class Entry:
    subject: str
    time: datetime
    summary: str
    store_paths: tuple[str, ...]
    stream_sequence: int


def summarise(subject: str, body: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    """One line for a person, and the store paths the event names."""
    if subject == "push.received":
        return f"{body.get('forge')} push {str(body.get('commit'))[:12]}", ()
    if subject == "eval.done":
        attrs = body.get("attributes") or []
        names = ", ".join(a.get("attribute", "?") for a in attrs)
        return f"{body.get('status')}: {names or body.get('error', '')}", ()
    if subject == "build.done":
        outs = tuple(o.get("path", "") for o in body.get("outputs") or [])
        closure = body.get("closure") or []
        return f"{body.get('status')}: {len(closure)} paths in the closure", outs
    if subject == "path.wanted":
        paths = tuple(body.get("store_paths") or ())
        return (
            f"node {body.get('node')} wants {len(paths)} path(s) ({body.get('requester')})",
            paths,
        )
    if subject == "path.available":
        path = body.get("store_path") or ""
        who = f"{body.get('holder_kind')} {body.get('holder')}"
        return f"{body.get('state')} at {who}", ((path,) if path else ())
    return "", ()


async def collect(js: JetStreamContext, trace: str) -> list[Entry]:
    entries: list[Entry] = []
    for subject in SUBJECTS:
        try:
            stored = await view(js, subject, last=_SCAN)
        except LookupError:
            continue
        entries.extend(_entry(m) for m in stored if trace_id(m.headers) == trace)
    return sorted(entries, key=lambda e: (e.time, e.stream_sequence))


def _entry(message: StoredMessage) -> Entry:
    try:
        body = json.loads(message.data)
    except ValueError:
        body = {}
    # A routed event is stored below its subject (path.wanted.<node>): name it by its subject.
    subject = next((s for s in SUBJECTS if message.subject.startswith(f"{s}.")), message.subject)
    summary, paths = summarise(subject, body if isinstance(body, dict) else {})
    assert message.time is not None
    return Entry(subject, message.time, summary, paths, message.sequence)
