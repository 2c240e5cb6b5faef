"""The `niphas` command: `up`, one command per installed service, `events`, `schemas`."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from pydantic_settings import BaseSettings

from niphas_common import cli_events, cli_logs, schema_export
from niphas_common.logs import configure_logging
from niphas_common.service import SERVICE_ORDER, ServiceSpec, discover, run_until_signalled
from niphas_common.settings import CommonSettings, LogSettings

app = typer.Typer(
    help="Niphas: run Nix closures, not container images, on Kubernetes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(cli_events.app, name="events")
app.command("logs")(cli_logs.logs)
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

    installed = list(discover())
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
    for path in schema_export.write_all(directory):
        typer.echo(f"wrote {path}")


@schemas_app.command("check")
def schemas_check(
    directory: Annotated[Path, typer.Argument(help="Where the files live")] = Path("schemas"),
) -> None:
    """Fail when the files differ from what the models generate."""
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


def build_app() -> typer.Typer:
    services = discover()
    for name, spec in services.items():
        app.command(name, help=spec.summary)(spec.command or _service_command(spec))
        for command_name, command in spec.extra_commands:
            app.command(command_name)(command)
    for name in SERVICE_ORDER:
        if name not in services:
            app.command(name, hidden=True)(_missing_command(name))
    return app


def main() -> None:
    """The command, with the errors a user can cause (a missing file, no cluster) as one
    line and exit status 1 instead of a traceback."""
    try:
        build_app()(prog_name="niphas")
    except Exception as exc:
        from niphas_common.kube.config import NoCluster  # not imported by every command

        if not isinstance(exc, OSError | NoCluster):
            raise
        typer.echo(f"niphas: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
