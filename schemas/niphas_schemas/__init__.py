"""Versioned event bodies for the Niphas subjects (the only contract between services)."""

from niphas_schemas.events import (
    EVENT_TYPES,
    SCHEMA_VERSION,
    SUBJECTS,
    BuildDone,
    BuiltOutput,
    EvalDone,
    EvaluatedAttribute,
    Event,
    PathAvailable,
    PathWanted,
    PushReceived,
)

__all__ = [
    "EVENT_TYPES",
    "SCHEMA_VERSION",
    "SUBJECTS",
    "BuildDone",
    "BuiltOutput",
    "EvalDone",
    "EvaluatedAttribute",
    "Event",
    "PathAvailable",
    "PathWanted",
    "PushReceived",
]
