"""Every setting as a row (variable, default, description), read from the settings models, so
`niphas settings` and the docs never drift from the code."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import AliasChoices
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings


@dataclass(frozen=True)
class SettingRow:
    variables: tuple[str, ...]
    default: str
    description: str


def rows(model: type[BaseSettings]) -> list[SettingRow]:
    prefix = str(model.model_config.get("env_prefix") or "")
    out = []
    for name, field in model.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            variables = tuple(str(choice) for choice in alias.choices)
        elif isinstance(alias, str):
            variables = (alias,)
        else:
            variables = (f"{prefix}{name}".upper(),)
        if field.default_factory is not None:
            default = f"{field.default_factory.__name__}()"
        elif field.default is PydanticUndefined:
            default = "(required)"
        else:
            default = "" if field.default is None else str(field.default)
        out.append(SettingRow(variables, default, field.description or ""))
    return out
