"""Reporter fixtures: a fake forge on loopback and a credentials file pointing at it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from niphas_reporter.settings import ReporterSettings

from .fake_forge import FakeForge, serving_forge

TOKENS = {"acme/hub": "ghp-secret-1", "acme/tea": "gitea-secret-2", "acme/lab": "glpat-secret-3"}
REPOS = {
    "github": "https://forge.test/acme/hub.git",
    "gitea": "https://forge.test/acme/tea.git",
    "gitlab": "ssh://git@forge.test/acme/lab.git",
}


@pytest.fixture
async def forge() -> AsyncIterator[FakeForge]:
    async with serving_forge(FakeForge(dict(TOKENS))) as served:
        yield served


def write_credentials(path: Path, api: str) -> Path:
    """One entry per forge (GitLab's over ssh: statuses need only the token), each naming
    its forge and the fake's API base."""
    path.write_text(
        yaml.safe_dump(
            {
                REPOS["github"]: {"token": TOKENS["acme/hub"], "forge": "github", "api_url": api},
                REPOS["gitea"]: {
                    "token_file": str(path.with_name("tea-token")),
                    "api_url": f"{api}/api/v1",
                },
                REPOS["gitlab"]: {
                    "token": TOKENS["acme/lab"],
                    "forge": "gitlab",
                    "api_url": f"{api}/api/v4",
                    "ssh_key_file": "/nonexistent/key",
                    "known_hosts_file": "/nonexistent/known",
                },
            }
        )
    )
    path.with_name("tea-token").write_text(TOKENS["acme/tea"] + "\n")
    return path


@pytest.fixture
def reporter_settings(tmp_path: Path, forge: FakeForge) -> ReporterSettings:
    return ReporterSettings(
        state_dir=tmp_path / "state",
        credentials_file=write_credentials(tmp_path / "credentials.yaml", forge.url),
        public_url="http://reporter.test:8095",
        backoff_s=0.01,
        backoff_max_s=0.05,
        attempts=4,
    )
