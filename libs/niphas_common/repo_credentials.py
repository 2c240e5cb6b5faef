"""The per-repository credentials file, shared by every service that talks to a forge.

A YAML (or JSON) file (in a cluster: the Secret `niphas-git-credentials`) maps a repository
URL, or a URL prefix ending in `/`, to how to reach it:

    "https://git.example.com/acme/private.git":
      username: niphas               # default: x-access-token (GitHub's, Gitea's any name)
      token_file: /var/run/secrets/niphas/git/acme-token   # or token: "..." (file preferred)
      forge: gitea                   # for commit statuses: github, gitea, forgejo or gitlab
      api_url: https://git.example.com/api/v1   # default: derived from the URL and forge
    "ssh://git@git.example.com/acme/":
      ssh_key_file: /var/run/secrets/niphas/git/id_ed25519
      known_hosts_file: /var/run/secrets/niphas/git/known_hosts   # required for ssh

Eval gives git the entries of the repositories it fetches; the reporter uses an entry's
token to post commit statuses to its forge. `CredentialsFile` re-reads the file when it
changes (a rotated Secret applies without a restart); a missing file means no entries.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import yaml

DEFAULT_USERNAME = "x-access-token"
FORGES: Final = ("github", "gitea", "forgejo", "gitlab")
_FIELDS: Final = frozenset(
    {"username", "token", "token_file", "ssh_key_file", "known_hosts_file", "forge", "api_url"}
)


class CredentialsError(ValueError):
    """The credentials file cannot be used."""


@dataclass(frozen=True)
class RepositoryCredential:
    url: str
    """A repository URL, or a prefix ending in `/`."""
    username: str = DEFAULT_USERNAME
    token: str | None = None
    token_file: Path | None = None
    ssh_key_file: Path | None = None
    known_hosts_file: Path | None = None
    forge: str | None = None
    """Which forge's API answers for the repository (commit statuses); None: guessed."""
    api_url: str | None = None
    """The forge's API base URL; None: derived from the repository URL and forge."""

    def __repr__(self) -> str:  # never print the token
        return f"RepositoryCredential(url={self.url!r}, token=<hidden>)"

    def matches(self, url: str) -> bool:
        own, other = plain_url(self.url), plain_url(url)
        if self.url.endswith("/"):
            return other.startswith(own + "/")
        return own == other

    @property
    def has_token(self) -> bool:
        return self.token is not None or self.token_file is not None

    def read_token(self) -> str | None:
        if self.token_file is not None:
            return self.token_file.read_text().strip() or None
        return self.token


def plain_url(url: str) -> str:
    """`url` without a `git+` prefix, query, trailing `/` or `.git`, for comparing."""
    url = url.removeprefix("git+").split("?", 1)[0].rstrip("/")
    return url[:-4] if url.endswith(".git") else url


def parse_credentials(data: Any, *, origin: str) -> list[RepositoryCredential]:
    if data is None:
        return []
    if not isinstance(data, Mapping):
        raise CredentialsError(f"{origin}: expected a mapping of repository URL -> entry")
    found: list[RepositoryCredential] = []
    for url, entry in data.items():
        where = f"{origin}: {url!r}"
        if not isinstance(url, str) or "://" not in url:
            raise CredentialsError(f"{where}: keys are repository URLs (or prefixes ending /)")
        if not isinstance(entry, Mapping) or set(entry) - _FIELDS:
            raise CredentialsError(f"{where}: expected fields among {sorted(_FIELDS)}")
        if not all(isinstance(v, str) and v for v in entry.values()):
            raise CredentialsError(f"{where}: every field is a non-empty string")
        if entry.get("forge") not in (None, *FORGES):
            raise CredentialsError(f"{where}: forge is one of {', '.join(FORGES)}")
        if "api_url" in entry and urlsplit(entry["api_url"]).scheme not in ("http", "https"):
            raise CredentialsError(f"{where}: api_url is an http(s) URL")
        paths = {k: Path(entry[k]) for k in ("token_file", "ssh_key_file", "known_hosts_file")
                 if k in entry}  # fmt: skip
        credential = RepositoryCredential(
            url,
            entry.get("username", DEFAULT_USERNAME),
            entry.get("token"),
            forge=entry.get("forge"),
            api_url=entry.get("api_url"),
            **paths,
        )
        scheme = urlsplit(url.removeprefix("git+")).scheme
        if scheme in ("http", "https") and not credential.has_token:
            raise CredentialsError(f"{where}: an http(s) entry needs token or token_file")
        if scheme == "ssh" and (credential.ssh_key_file is None or
                                credential.known_hosts_file is None):  # fmt: skip
            raise CredentialsError(f"{where}: an ssh entry needs ssh_key_file and "
                                   "known_hosts_file")  # fmt: skip
        found.append(credential)
    return found


class CredentialsFile:
    """The credentials file, re-read when it changes; `log` is the reader's logger."""

    def __init__(self, file: Path | None, log: logging.Logger) -> None:
        self._file = file
        self._log = log
        self._stamp: tuple[int, int] | None = None
        self._entries: list[RepositoryCredential] = []
        self._reload()

    def replace(self, entries: Iterable[RepositoryCredential]) -> None:
        """Use `entries` instead of a file's (tests, and callers without a file)."""
        self._file, self._entries = None, list(entries)

    def _reload(self) -> None:
        if self._file is None:
            return
        try:
            stat = self._file.stat()
        except FileNotFoundError:
            # An optional Secret not created: no entries (said once).
            if self._entries or self._stamp != (0, 0):
                self._log.info("no credentials file %s: public repositories only", self._file)
            self._entries, self._stamp = [], (0, 0)
            return
        try:
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp == self._stamp:
                return
            entries = parse_credentials(yaml.safe_load(self._file.read_text()),
                                        origin=str(self._file))  # fmt: skip
        except (OSError, yaml.YAMLError, CredentialsError) as exc:
            self._log.error("credentials %s not (re)loaded: %s", self._file, exc)
            return
        self._entries, self._stamp = entries, stamp
        self._log.info("loaded credentials of %d repositories from %s", len(entries), self._file)

    def for_urls(self, urls: Iterable[str]) -> list[RepositoryCredential]:
        """The entries matching any of `urls` (the file re-read first if it changed)."""
        self._reload()
        wanted = list(urls)
        return [c for c in self._entries if any(c.matches(u) for u in wanted)]

    def for_url(self, url: str) -> RepositoryCredential | None:
        """The most specific entry for `url`: an exact one before the longest prefix."""
        found = self.for_urls([url])
        exact = [c for c in found if not c.url.endswith("/")]
        ranked = exact or sorted(found, key=lambda c: len(c.url), reverse=True)
        return ranked[0] if ranked else None
