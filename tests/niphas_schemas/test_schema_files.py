"""The checked-in JSON Schema files and AsyncAPI document match the models; a model change
without regenerating them is caught."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import yaml

from niphas_common.schema_export import ASYNCAPI_FILE, drift, render_all, schema_filename
from niphas_schemas import EVENT_TYPES, PushReceived

SCHEMAS_DIR = Path(__file__).resolve().parents[2] / "schemas"


def test_checked_in_files_match_the_models() -> None:
    assert drift(SCHEMAS_DIR) == [], "run `niphas schemas export` and commit schemas/"


def test_a_changed_model_is_reported_as_drift(tmp_path: Path) -> None:
    for name, text in render_all().items():
        (tmp_path / name).write_text(text)
    assert drift(tmp_path) == []

    class PushReceivedWithBranch(PushReceived):
        subject: ClassVar[str] = "push.received"
        branch: str = "main"

    changed = tuple(PushReceivedWithBranch if m is PushReceived else m for m in EVENT_TYPES)
    assert drift(tmp_path, changed) == [schema_filename(PushReceived), ASYNCAPI_FILE]


def test_json_schema_carries_validation_rules() -> None:
    schema = json.loads((SCHEMAS_DIR / schema_filename(PushReceived)).read_text())
    assert schema["x-nats-subject"] == "push.received"
    assert schema["additionalProperties"] is False
    assert "^([0-9a-f]{40}|[0-9a-f]{64})$" in json.dumps(schema["properties"]["commit"])


def test_asyncapi_lists_every_subject_with_its_payload() -> None:
    doc = yaml.safe_load((SCHEMAS_DIR / ASYNCAPI_FILE).read_text())
    assert doc["asyncapi"].startswith("3.")
    assert set(doc["channels"]) == {m.subject for m in EVENT_TYPES}
    payloads = {
        m["payload"]["$ref"].rsplit("/", 1)[1] for m in doc["components"]["messages"].values()
    }
    assert payloads == {m.__name__ for m in EVENT_TYPES}
