"""A service's process imports that service only: `python -m niphas_common <service>` (a pod's
whole command line) builds the one command it names, so the mesh agent carries neither the
other services, the operator's Kubernetes client, nor the `events`/`logs` commands and the
schema exporter. Help and unknown names still see every command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from niphas_common.service import SERVICE_ORDER, discover
from tests.niphas_common.test_events_cli import NIPHAS

# Runs the module as a pod runs it, then writes the names of every module it imported. `--help`
# resolves and builds the command exactly as running it does, without starting the service.
PROBE = """
import json, runpy, sys
out, sys.argv = sys.argv[1], ["niphas", *sys.argv[2:]]
try:
    runpy.run_module("niphas_common", run_name="__main__", alter_sys=True)
finally:
    with open(out, "w") as f:
        json.dump(sorted(sys.modules), f)
"""

CLI_ONLY = ("niphas_common.cli_events", "niphas_common.cli_logs", "niphas_common.schema_export")

INSTALLED = discover()


def imported_by(tmp_path: Path, *args: str, status: int = 0) -> set[str]:
    out = tmp_path / "modules.json"
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(out), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == status, result.stderr
    assert "Usage: niphas" in result.stdout + result.stderr, result
    modules: list[str] = json.loads(out.read_text())
    return set(modules)


def niphas(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "120"}  # one help row per command
    return subprocess.run([NIPHAS, *args], capture_output=True, text=True, timeout=120, env=env)


def packages(modules: set[str]) -> set[str]:
    return {name.split(".")[0] for name in modules}


def test_the_mesh_command_imports_the_mesh_and_no_other_service(tmp_path: Path) -> None:
    modules = imported_by(tmp_path, "mesh", "--help")
    assert "niphas_mesh.app" in modules
    others = {f"niphas_{name}" for name in SERVICE_ORDER if name != "mesh"}
    assert not packages(modules) & others, sorted(packages(modules) & others)
    assert "kubernetes_asyncio" not in packages(modules)
    assert not modules & set(CLI_ONLY), sorted(modules & set(CLI_ONLY))


@pytest.mark.parametrize("service", [name for name in INSTALLED if name != "mesh"])
def test_every_service_command_imports_its_own_service_only(tmp_path: Path, service: str) -> None:
    modules = imported_by(tmp_path, service, "--help")
    own = f"niphas_{service}"
    assert own in packages(modules)
    others = {f"niphas_{name}" for name in SERVICE_ORDER if name != service}
    assert not packages(modules) & others, sorted(packages(modules) & others)
    assert not modules & set(CLI_ONLY), sorted(modules & set(CLI_ONLY))


def test_up_checks_the_services_it_starts_without_importing_them(tmp_path: Path) -> None:
    # The supervisor only starts `python -m niphas_common <service>` processes. Finding a
    # service's module imports its package (an `__init__` with a docstring), not its code.
    modules = imported_by(tmp_path, "up", "--service", "nosuch", status=2)
    code = {m for m in modules if m.split(".")[0] in {f"niphas_{n}" for n in SERVICE_ORDER}}
    assert code <= {f"niphas_{name}" for name in SERVICE_ORDER}, sorted(code)


def test_help_lists_every_command_and_unknown_names_are_refused_with_a_suggestion() -> None:
    listing = niphas("--help")
    assert listing.returncode == 0, listing.stderr
    names = [line.split()[1] for line in listing.stdout.splitlines() if line.startswith("│ ")]
    extras = [name for spec in INSTALLED.values() for name, _ in spec.extra_commands]
    for name in ["logs", "up", "settings", *INSTALLED, *extras, "events", "schemas"]:
        assert name in names, listing.stdout

    # An extra command of a service is reached by its name alone.
    for name in extras:
        extra = niphas(name, "--help")
        assert extra.returncode == 0 and f"Usage: niphas {name}" in extra.stdout, extra

    typo = niphas("mesj")
    assert typo.returncode == 2
    assert "No such command 'mesj'" in typo.stderr and "Did you mean 'mesh'?" in typo.stderr
