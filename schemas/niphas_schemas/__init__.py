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
    WorkloadPhase,
    WorkloadRolled,
)
from niphas_schemas.holders import HOLDERS_BUCKET, NodeRecord

__all__ = [
    "EVENT_TYPES",
    "HOLDERS_BUCKET",
    "SCHEMA_VERSION",
    "SUBJECTS",
    "BuildDone",
    "BuiltOutput",
    "EvalDone",
    "EvaluatedAttribute",
    "Event",
    "NodeRecord",
    "PathAvailable",
    "PathWanted",
    "PushReceived",
    "WorkloadPhase",
    "WorkloadRolled",
]
