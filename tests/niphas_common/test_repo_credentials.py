"""The per-repository credentials file shared by eval (git) and the reporter (forge API):
the forge fields, the most specific entry for a URL, and bad entries refused with a line
naming the entry."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import yaml

from niphas_common.repo_credentials import CredentialsError, CredentialsFile, parse_credentials

log = logging.getLogger(__name__)


def test_the_most_specific_entry_answers(tmp_path: Path) -> None:
    file = tmp_path / "credentials.yaml"
    file.write_text(
        yaml.safe_dump(
            {
                "https://git.example.com/": {"token": "org-wide", "forge": "gitea"},
                "https://git.example.com/acme/": {"token": "acme"},
                "https://git.example.com/acme/app.git": {
                    "token": "app",
                    "forge": "forgejo",
                    "api_url": "https://api.example.com/v1",
                },
            }
        )
    )
    credentials = CredentialsFile(file, log)
    exact = credentials.for_url("https://git.example.com/acme/app")
    assert exact is not None and exact.read_token() == "app" and exact.forge == "forgejo"
    assert exact.api_url == "https://api.example.com/v1"
    prefix = credentials.for_url("https://git.example.com/acme/other.git")
    assert prefix is not None and prefix.read_token() == "acme"
    assert credentials.for_url("https://elsewhere.example/acme/app.git") is None


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"token": "t", "forge": "bitbucket"}, "forge is one of github, gitea, forgejo, gitlab"),
        ({"token": "t", "api_url": "ftp://x"}, "api_url is an http(s) URL"),
        ({"token": "t", "colour": "red"}, "expected fields among"),
    ],
)
def test_bad_entries_are_refused_naming_them(entry: dict[str, str], message: str) -> None:
    with pytest.raises(CredentialsError, match=re.escape(message)) as info:
        parse_credentials({"https://git.example.com/a/b.git": entry}, origin="creds.yaml")
    assert "creds.yaml: 'https://git.example.com/a/b.git'" in str(info.value)
