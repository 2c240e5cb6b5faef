"""The `niphas` command: `up`, one command per installed service, `events`, `schemas`.

A command is built only when it is named: `niphas mesh` (a pod's whole command line) imports
the mesh and none of the other services, nor the NATS client and tables of `events` and
`logs`. Help, completion and an unknown name build them all (the list names every command,
an unknown one gets "did you mean").
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from typer.core import TyperGroup

from niphas_common.logs import configure_logging
from niphas_common.service import (
    ENTRY_POINT_GROUP,
    SERVICE_ORDER,
    ServiceSpec,
    discover,
    in_start_order,
    load_spec,
    run_until_signalled,
)
from niphas_common.settings import CommonSettings, LogSettings

if TYPE_CHECKING:
    from pydantic_settings import BaseSettings
    from typer._click import Command, Context  # typer's own click (it vendors one)


class LazyCommands(TyperGroup):
    """The top-level group: `up`, `settings` and `schemas` are built with it (they import
    what they need when run); every other command when it is first named."""

    every_built = False

    def get_command(self, ctx: Context, cmd_name: str) -> Command | None:
        if cmd_name not in self.commands:
            named = command_named(cmd_name)
            self._add(named if named is not None else self._every())
        return self.commands.get(cmd_name)

    def list_commands(self, ctx: Context) -> list[str]:
        self._add(self._every())
        # The order of the help: logs, up, settings, the services in start order each with its
        # own extra commands, then the groups.
        head = [name for name in ("logs", "up", "settings") if name in self.commands]
        tail = [name for name in ("events", "schemas") if name in self.commands]
        return head + [n for n in self.commands if n not in head + tail] + tail

    def _every(self) -> dict[str, Command]:
        if self.every_built:
            return {}
        self.every_built = True
        return every_command()

    def _add(self, commands: dict[str, Command]) -> None:
        for name, command in commands.items():
            self.commands.setdefault(name, command)


app = typer.Typer(
    cls=LazyCommands,
    help="Niphas: run Nix closures, not container images, on Kubernetes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
schemas_app = typer.Typer(help="The event contract files under schemas/.")
app.add_typer(schemas_app, name="schemas")


@app.callback()
def _setup() -> None:
    settings = LogSettings()
    configure_logging(settings.level, settings.format)


@app.command()
def up(
    service: Annotated[
        list[str] | None, typer.Option("--service", "-s", help="Run only these services")
    ] = None,
    nats_url: Annotated[
        str | None,
        typer.Option("--nats-url", envvar="NATS_URL", help="Use this server, not an embedded one"),
    ] = None,
    state_dir: Annotated[
        Path | None, typer.Option(help="State directory (default: NIPHAS_STATE_DIR)")
    ] = None,
) -> None:
    """Start NATS and every installed service on this machine, until Ctrl-C."""
    from niphas_common.up import run_up

    installed = installed_names()
    chosen = service or installed
    unknown = sorted(set(chosen) - set(installed))
    if unknown:
        raise typer.BadParameter(f"not installed: {', '.join(unknown)}", param_hint="--service")
    raise typer.Exit(run_up(state_dir or CommonSettings().state_dir, chosen, nats_url))


@app.command()
def settings(
    service: Annotated[str | None, typer.Argument(help="Only this service's settings")] = None,
) -> None:
    """List every environment setting with its default and meaning."""
    from rich.console import Console
    from rich.table import Table

    from niphas_common.settings import CommonSettings, LogSettings, NatsSettings
    from niphas_common.settings_doc import rows

    models: list[type[BaseSettings]] = []
    if service is None:
        models += [CommonSettings, LogSettings, NatsSettings]
    installed = discover()
    if service is not None and service not in installed:
        names = ", ".join(installed) or "none"
        typer.echo(f"niphas settings: no service {service!r}; services: {names}", err=True)
        raise typer.Exit(2)
    for name, spec in installed.items():
        if service in (None, name):
            models += list(spec.settings)
    table = Table("variable", "default", "meaning")
    for model in models:
        for row in rows(model):
            table.add_row(" / ".join(row.variables), row.default, row.description)
    Console(width=None if sys.stdout.isatty() else 200).print(table)


@schemas_app.command("export")
def schemas_export(
    directory: Annotated[Path, typer.Argument(help="Where the files live")] = Path("schemas"),
) -> None:
    """Regenerate the JSON Schema files and the AsyncAPI document from the models."""
    from niphas_common import schema_export  # every subject's model: only for this command

    for path in schema_export.write_all(directory):
        typer.echo(f"wrote {path}")


@schemas_app.command("check")
def schemas_check(
    directory: Annotated[Path, typer.Argument(help="Where the files live")] = Path("schemas"),
) -> None:
    """Fail when the files differ from what the models generate."""
    from niphas_common import schema_export

    stale = schema_export.drift(directory)
    if stale:
        typer.echo(f"out of date: {', '.join(stale)}; run `niphas schemas export`", err=True)
        raise typer.Exit(1)
    typer.echo("schemas up to date")


def _service_command(spec: ServiceSpec) -> Callable[[], None]:
    def run() -> None:
        asyncio.run(run_until_signalled(spec.main))

    run.__doc__ = spec.summary
    return run


def _missing_command(name: str) -> Callable[[], None]:
    def missing() -> None:
        typer.echo(f"the {name} service is not installed in this build", err=True)
        raise typer.Exit(2)

    missing.__doc__ = f"({name}: not installed)"
    return missing


def _commands_of(register: Callable[[typer.Typer], object]) -> dict[str, Command]:
    """The click commands `register` adds to a Typer, built as the top-level app builds its own."""
    part = typer.Typer(rich_markup_mode=app.rich_markup_mode)
    register(part)
    return dict(typer.main.get_group(part).commands)


def _bus_commands(name: str) -> dict[str, Command]:
    """`events` or `logs`: both bring the NATS client and rich's tables."""
    if name == "events":
        from niphas_common.cli_events import app as events

        return _commands_of(lambda part: part.add_typer(events, name="events"))
    from niphas_common.cli_logs import logs

    return _commands_of(lambda part: part.command("logs")(logs))


def _installed(name: str) -> ServiceSpec | None:
    """The one service `name` as `discover` finds it (None when not installed), importing no
    other service."""
    for ep in entry_points(group=ENTRY_POINT_GROUP, name=name):
        return load_spec(ep)
    return None


def installed_names() -> list[str]:
    """The installed services' names in start order, as `discover` lists them but without
    importing them: the supervisor of `niphas up` runs each in a process of its own (where a
    broken dependency fails loudly, as it would here)."""
    found = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            present = find_spec(ep.module) is not None
        except ModuleNotFoundError:  # its package is absent too
            present = False
        if present:
            found.append(ep.name)
    return in_start_order(found)


def _service_commands(
    specs: dict[str, ServiceSpec], missing: list[str]
) -> Callable[[typer.Typer], None]:
    def register(part: typer.Typer) -> None:
        for name, spec in specs.items():
            part.command(name, help=spec.summary)(spec.command or _service_command(spec))
            for command_name, command in spec.extra_commands:
                part.command(command_name)(command)
        for name in missing:
            part.command(name, hidden=True)(_missing_command(name))

    return register


def command_named(name: str) -> dict[str, Command] | None:
    """The command `name` built alone (a service's with its extra commands, a service not
    installed as a hidden command saying so); None when only building every command can
    tell (an extra command such as `rollback`, or a typo)."""
    if name in ("events", "logs"):
        return _bus_commands(name)
    if name not in set(entry_points(group=ENTRY_POINT_GROUP).names) | set(SERVICE_ORDER):
        return None
    spec = _installed(name)
    specs = {name: spec} if spec is not None else {}
    return _commands_of(_service_commands(specs, [] if specs else [name]))


def every_command() -> dict[str, Command]:
    """Every lazily built command, for help, completion and names no service declares."""
    services = discover()
    missing = [n for n in SERVICE_ORDER if n not in services]
    commands = _bus_commands("logs")
    commands |= _commands_of(_service_commands(services, missing))
    return commands | _bus_commands("events")


def main() -> None:
    """The command, with the errors a user can cause (a missing file, no cluster) as one
    line and exit status 1 instead of a traceback."""
    try:
        app(prog_name="niphas")
    except Exception as exc:
        from niphas_common.kube.config import NoCluster  # not imported by every command

        if not isinstance(exc, OSError | NoCluster):
            raise
        typer.echo(f"niphas: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
