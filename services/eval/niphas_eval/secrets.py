"""Per-repository webhook secrets, from a mounted file and/or the environment.

Format (YAML; JSON is YAML too), one entry per repository, keyed by its clone URL or its full
name (`owner/name`, GitLab's `path_with_namespace`):

    acme/app:
      forge: github            # github | gitea | forgejo | gitlab
      secret: "s3cr3t"         # the webhook secret (GitLab: the secret token)
    "https://git.example.com/acme/site.git":
      forge: forgejo           # gitea and forgejo entries are both served by /hooks/gitea
      secret_env: SITE_HOOK_SECRET   # or: read the secret from this environment variable
      clone_url: "ssh://git@git.example.com/acme/site.git"  # optional: evaluate this URL

A repository without an entry, or whose entry has no (non-empty) secret, is refused: nothing is
ever accepted unauthenticated. An entry answers only its own forge's endpoint, and only for its
own repository: the entry whose secret verified a delivery decides what is evaluated (its
`clone_url`, else its key when that is a URL; an entry keyed by full name takes the payload's
clone URL only when it is an http(s)/ssh/git URL of a repository of that name). The file is re-read
when its modification time changes, so a rotated Kubernetes Secret takes effect without a
restart.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

log = logging.getLogger(__name__)

FORGES = ("github", "gitea", "forgejo", "gitlab")
FAMILY = {"github": "github", "gitea": "gitea", "forgejo": "gitea", "gitlab": "gitlab"}
"""Which endpoint serves an entry's forge: Gitea and Forgejo share /hooks/gitea."""


class SecretsError(ValueError):
    """The secrets file or variable cannot be used."""


@dataclass(frozen=True)
class RepositorySecret:
    key: str
    forge: str
    secret: str
    clone_url: str | None = None
    own: frozenset[str] = field(init=False, repr=False, compare=False)
    """The normalised names of this entry's repository: its key and its clone_url."""

    def __post_init__(self) -> None:
        names = [self.key, self.clone_url] if self.clone_url else [self.key]
        object.__setattr__(self, "own", frozenset(normalise_key(n) for n in names))

    def __repr__(self) -> str:  # never print the secret itself
        return f"RepositorySecret(key={self.key!r}, forge={self.forge!r}, secret=<hidden>)"

    def names_any(self, keys: Iterable[str]) -> bool:
        """Whether one of `keys` (a payload's names for its repository) is this entry's
        repository: its key or its clone_url."""
        return any(normalise_key(key) in self.own for key in keys if key)

    def repository(self, payload_clone_url: str | None) -> str | None:
        """What a delivery verified by this entry evaluates: the entry's clone_url, its key
        when that is a URL, or (an entry keyed by full name) the payload's clone URL when it
        names this repository; None when the payload's URL is some other repository's."""
        if self.clone_url:
            return self.clone_url
        if is_url(self.key):
            return self.key
        if payload_clone_url and url_names(payload_clone_url, self.key):
            return payload_clone_url
        return None


def is_url(key: str) -> bool:
    return "://" in key


@lru_cache(maxsize=1024)  # pushes of a repository repeat the same URL
def url_names(url: str, full_name: str) -> bool:
    """`url` is a remote (http(s), ssh, git) URL of a repository named like `full_name`."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not one)
    except ValueError:
        return False
    if parts.scheme not in ("https", "http", "ssh", "git") or not parts.hostname:
        return False
    # The repository's own name (the last segment): forges serve a repository under
    # prefixes of their own (`/git/acme/app.git`, a mirror's `/app/.git`).
    path = normalise_key(normalise_key(parts.path)).rsplit("/", 1)[-1]
    return path != "" and path == normalise_key(full_name).rsplit("/", 1)[-1]


def parse_secrets(data: Any, *, origin: str) -> dict[str, RepositorySecret]:
    """Validate a loaded mapping; entries whose secret is empty are left out (refused)."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise SecretsError(f"{origin}: expected a mapping of repository -> entry")
    entries: dict[str, RepositorySecret] = {}
    for key, entry in data.items():
        where = f"{origin}: {key!r}"
        if not isinstance(key, str) or not key:
            raise SecretsError(f"{where}: keys are repository clone URLs or full names")
        if not isinstance(entry, Mapping):
            raise SecretsError(f"{where}: expected {{forge, secret | secret_env}}")
        unknown = set(entry) - {"forge", "secret", "secret_env", "clone_url"}
        if unknown:
            raise SecretsError(f"{where}: unknown fields {sorted(unknown)}")
        forge = entry.get("forge")
        if forge not in FORGES:
            raise SecretsError(f"{where}: forge must be one of {', '.join(FORGES)}")
        secret = entry.get("secret")
        if secret is None and entry.get("secret_env"):
            secret = os.environ.get(str(entry["secret_env"]))
        if secret is not None and not isinstance(secret, str):
            raise SecretsError(f"{where}: secret must be a string")
        clone_url = entry.get("clone_url")
        if clone_url is not None and not isinstance(clone_url, str):
            raise SecretsError(f"{where}: clone_url must be a string")
        if not secret:
            log.warning("%s has no secret: its webhooks will be refused", where)
            continue
        entries[normalise_key(key)] = RepositorySecret(key, forge, secret, clone_url)
    return entries


def normalise_key(key: str) -> str:
    """Keys compare without case, trailing slashes or a `.git` suffix."""
    key = key.strip().rstrip("/").lower()
    return key[:-4] if key.endswith(".git") else key


class WebhookSecrets:
    """Looks up the secret for a delivery's repository (file entries win over env entries)."""

    def __init__(self, file: Path | None = None, env_json: str | None = None) -> None:
        self._file = file
        self._env: dict[str, RepositorySecret] = {}
        if env_json:
            try:
                loaded = json.loads(env_json)
            except json.JSONDecodeError as exc:
                raise SecretsError(f"NIPHAS_EVAL_WEBHOOK_SECRETS is not JSON: {exc}") from None
            self._env = parse_secrets(loaded, origin="NIPHAS_EVAL_WEBHOOK_SECRETS")
        self._file_entries: dict[str, RepositorySecret] = {}
        self._file_stamp: tuple[int, int] | None = None
        self._file_missing = False
        self._by_family: dict[str, list[RepositorySecret]] = {}
        """`candidates` per endpoint, until the file's entries change."""
        self._reload()

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> WebhookSecrets:
        return cls(env_json=json.dumps(dict(data)))

    def _reload(self) -> None:
        if self._file is None:
            return
        try:
            stat = self._file.stat()
        except OSError as exc:
            if not self._file_missing:  # once per disappearance; the service's readiness
                # names the Secret (ServiceRuntime.requires_file)
                log.warning("webhook secrets file %s unreadable: %s", self._file, exc)
            if self._file_entries:
                self._by_family = {}
            self._file_entries, self._file_stamp, self._file_missing = {}, None, True
            return
        self._file_missing = False
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._file_stamp:
            return
        try:
            loaded = yaml.safe_load(self._file.read_text())
            entries = parse_secrets(loaded, origin=str(self._file))
        except (OSError, yaml.YAMLError, SecretsError) as exc:
            # Keep the last good entries rather than refusing everything on a bad edit.
            log.error("webhook secrets file %s not reloaded: %s", self._file, exc)
            return
        self._file_entries, self._file_stamp, self._by_family = entries, stamp, {}
        log.info("loaded %d webhook secrets from %s", len(entries), self._file)

    def lookup(self, keys: Iterable[str], family: str) -> RepositorySecret | None:
        """The first entry matching one of `keys` (in order) served by endpoint `family`."""
        self._reload()
        for key in keys:
            if not key:
                continue
            norm = normalise_key(key)
            entry = self._file_entries.get(norm) or self._env.get(norm)
            if entry is not None and FAMILY[entry.forge] == family:
                return entry
        return None

    def candidates(self, family: str) -> list[RepositorySecret]:
        """Every entry served by endpoint `family` (file entries win over env entries)."""
        self._reload()
        found = self._by_family.get(family)
        if found is None:
            merged = {**self._env, **self._file_entries}
            found = [entry for entry in merged.values() if FAMILY[entry.forge] == family]
            self._by_family[family] = found
        return list(found)

    def __len__(self) -> int:
        return len({**self._env, **self._file_entries})
