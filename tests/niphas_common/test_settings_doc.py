"""Every setting is documented: it has a description, `niphas settings` lists it, and its
variable appears in the README that covers it (the top README for the shared settings, each
service's README for its own)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pydantic_settings import BaseSettings

from niphas_common.service import discover
from niphas_common.settings import CommonSettings, LogSettings, NatsSettings
from niphas_common.settings_doc import rows

ROOT = Path(__file__).resolve().parents[2]
SHARED: list[type[BaseSettings]] = [CommonSettings, LogSettings, NatsSettings]


def documented_in(readme: Path, models: list[type[BaseSettings]]) -> list[str]:
    text = readme.read_text()
    return [
        row.variables[0]
        for model in models
        for row in rows(model)
        if not any(variable in text for variable in row.variables)
    ]


def test_shared_settings_have_descriptions_and_are_in_the_readme() -> None:
    for model in SHARED:
        assert all(row.description for row in rows(model)), model.__name__
    assert documented_in(ROOT / "README.md", SHARED) == []


def test_service_settings_are_documented() -> None:
    for name, spec in discover().items():
        models = list(spec.settings)
        for model in models:
            assert all(row.description for row in rows(model)), model.__name__
        readme = ROOT / "services" / name / "README.md"
        assert documented_in(readme, models) == [], name


def test_niphas_settings_lists_them() -> None:
    out = subprocess.run(
        [str(Path(sys.executable).with_name("niphas")), "settings"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    for model in SHARED:
        for row in rows(model):
            assert row.variables[0] in out
