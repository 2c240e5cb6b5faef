"""docker-compose.test.yml cannot run here (no Docker daemon): it parses, NATS runs with
JetStream, every other service it names is a `niphas` service run by its own command, and
every variable it sets is a setting `niphas settings` lists."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from niphas_common.service import discover
from niphas_common.settings import CommonSettings, LogSettings, NatsSettings
from niphas_common.settings_doc import rows

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.test.yml"


def known_variables() -> set[str]:
    models: list[Any] = [CommonSettings, LogSettings, NatsSettings]
    for spec in discover().values():
        models += list(spec.settings)
    return {variable for model in models for row in rows(model) for variable in row.variables}


def test_compose_names_the_niphas_services_with_known_settings() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services: dict[str, Any] = compose["services"]
    assert "-js" in services["nats"]["command"]
    ours = {name: s for name, s in services.items() if name != "nats"}
    assert set(ours) == set(discover())
    known = known_variables()
    for name, service in ours.items():
        assert service["command"] == [name]
        assert service["depends_on"]["nats"]["condition"] == "service_healthy"
        unknown = [v for v in service["environment"] if v not in known]
        assert unknown == [], name
        assert service["environment"]["NATS_URL"] == "nats://nats:4222"
