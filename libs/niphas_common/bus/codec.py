"""Bytes on the bus <-> event models. Anything we cannot read is a `PoisonMessage`."""

from __future__ import annotations

import json
from typing import TypeVar

from pydantic import ValidationError

from niphas_common.errors import PoisonMessage
from niphas_schemas import SCHEMA_VERSION, Event

E = TypeVar("E", bound=Event)

HEADER_MSG_ID = "Nats-Msg-Id"
HEADER_EVENT_ID = "Niphas-Event-Id"


def encode(event: Event) -> bytes:
    # Readable JSON: people inspect streams by hand with `niphas events view`.
    return event.model_dump_json().encode()


def headers_for(event: Event) -> dict[str, str]:
    # Few headers: each one costs parsing on every delivery. The schema version is in the body.
    return {HEADER_MSG_ID: event.msg_id, HEADER_EVENT_ID: event.event_id}


def decode(model: type[E], data: bytes) -> E:
    """Parse and validate, naming what is wrong when it fails."""
    try:
        # pydantic's own JSON parser: one pass, no dict of Python objects in between.
        return model.model_validate_json(data)
    except ValidationError:
        pass  # read it again the slow way, to name the problem
    try:
        raw = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PoisonMessage(f"{model.subject}: body is not JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise PoisonMessage(f"{model.subject}: body is not a JSON object")
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise PoisonMessage(
            f"{model.subject}: unknown schema_version {version!r} "
            f"(this build reads {SCHEMA_VERSION})"
        )
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<body>'}: {err['msg']}"
            for err in exc.errors()[:5]
        )
        raise PoisonMessage(f"{model.subject}: invalid event ({problems})") from None
