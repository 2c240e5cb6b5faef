"""Per-repository credentials for fetching private flakes and their git inputs.

A YAML (or JSON) file, `NIPHAS_EVAL_GIT_CREDENTIALS_FILE` (in a cluster: a mounted Secret),
maps a repository URL, or a URL prefix ending in `/`, to how to reach it:

    "https://git.example.com/acme/private.git":
      username: niphas               # default: x-access-token (GitHub's, Gitea's any name)
      token_file: /var/run/secrets/niphas/git/acme-token   # or token: "..." (file preferred)
    "ssh://git@git.example.com/acme/":
      ssh_key_file: /var/run/secrets/niphas/git/id_ed25519
      known_hosts_file: /var/run/secrets/niphas/git/known_hosts   # required for ssh

For one evaluation, `git_environment(urls)` gives the variables that let `git` (run by `nix`
and by `git ls-remote`) use the credentials of exactly those repositories: a credential-store
file (0600, in a private directory removed afterwards) named through `GIT_CONFIG_*` variables
with `credential.useHttpPath` (a token answers only its own repository), and a
`GIT_SSH_COMMAND` naming the keys with `IdentitiesOnly`, `BatchMode` and strict host key
checking against the given known_hosts. The variables carry paths, never a secret, so a
command line, a log line or an error message cannot show one; token files are re-read on
every evaluation, so a rotated Secret applies without a restart.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import yaml

log = logging.getLogger(__name__)

DEFAULT_USERNAME = "x-access-token"


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

    def __repr__(self) -> str:  # never print the token
        return f"RepositoryCredential(url={self.url!r}, token=<hidden>)"

    def matches(self, url: str) -> bool:
        own, other = _plain(self.url), _plain(url)
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


def _plain(url: str) -> str:
    """`url` without a `git+` prefix, query, trailing `/` or `.git`, for comparing."""
    url = url.removeprefix("git+").split("?", 1)[0].rstrip("/")
    return url[:-4] if url.endswith(".git") else url


def parse_credentials(data: Any, *, origin: str) -> list[RepositoryCredential]:
    if data is None:
        return []
    if not isinstance(data, Mapping):
        raise CredentialsError(f"{origin}: expected a mapping of repository URL -> entry")
    fields = {"username", "token", "token_file", "ssh_key_file", "known_hosts_file"}
    found: list[RepositoryCredential] = []
    for url, entry in data.items():
        where = f"{origin}: {url!r}"
        if not isinstance(url, str) or "://" not in url:
            raise CredentialsError(f"{where}: keys are repository URLs (or prefixes ending /)")
        if not isinstance(entry, Mapping) or set(entry) - fields:
            raise CredentialsError(f"{where}: expected fields among {sorted(fields)}")
        if not all(isinstance(v, str) and v for v in entry.values()):
            raise CredentialsError(f"{where}: every field is a non-empty string")
        paths = {k: Path(entry[k]) for k in ("token_file", "ssh_key_file", "known_hosts_file")
                 if k in entry}  # fmt: skip
        credential = RepositoryCredential(
            url, entry.get("username", DEFAULT_USERNAME), entry.get("token"), **paths
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


class GitCredentials:
    """The credentials file, re-read when it changes."""

    def __init__(self, file: Path | None) -> None:
        self._file = file
        self._stamp: tuple[int, int] | None = None
        self._entries: list[RepositoryCredential] = []
        self._reload()

    @classmethod
    def from_entries(cls, entries: Iterable[RepositoryCredential]) -> GitCredentials:
        credentials = cls(None)
        credentials._entries = list(entries)
        return credentials

    def _reload(self) -> None:
        if self._file is None:
            return
        try:
            stat = self._file.stat()
        except FileNotFoundError:
            # An optional Secret not created: public repositories only (said once).
            if self._entries or self._stamp != (0, 0):
                log.info("no git credentials file %s: public repositories only", self._file)
            self._entries, self._stamp = [], (0, 0)
            return
        try:
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp == self._stamp:
                return
            entries = parse_credentials(yaml.safe_load(self._file.read_text()),
                                        origin=str(self._file))  # fmt: skip
        except (OSError, yaml.YAMLError, CredentialsError) as exc:
            log.error("git credentials %s not (re)loaded: %s", self._file, exc)
            return
        self._entries, self._stamp = entries, stamp
        log.info("loaded credentials of %d repositories from %s", len(entries), self._file)

    def for_urls(self, urls: Iterable[str]) -> list[RepositoryCredential]:
        self._reload()
        wanted = list(urls)
        return [c for c in self._entries if any(c.matches(u) for u in wanted)]

    @contextlib.contextmanager
    def git_environment(self, urls: Iterable[str], work_dir: Path) -> Iterator[dict[str, str]]:
        """Variables for git to reach `urls` with their credentials (empty without any)."""
        chosen = self.for_urls(urls)
        if not chosen:
            yield {}
            return
        work_dir.mkdir(parents=True, exist_ok=True)
        private = Path(tempfile.mkdtemp(prefix="git-credentials-", dir=work_dir))
        try:
            yield _environment(chosen, private)
        finally:
            shutil.rmtree(private, ignore_errors=True)


def _environment(chosen: list[RepositoryCredential], private: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    config: list[tuple[str, str]] = []
    lines = []
    for credential in chosen:
        try:
            token = credential.read_token()
        except OSError as exc:
            log.error("token of %s unreadable: %s", credential.url, exc.strerror)
            continue
        if token is None:
            continue
        parts = urlsplit(credential.url.removeprefix("git+"))
        user, secret = quote(credential.username, safe=""), quote(token, safe="")
        path = parts.path.rstrip("/")
        lines.append(f"{parts.scheme}://{user}:{secret}@{parts.netloc}{path}\n")
        if not path.endswith(".git"):
            lines.append(f"{parts.scheme}://{user}:{secret}@{parts.netloc}{path}.git\n")
    if lines:
        store = private / "store"
        store.touch(mode=0o600)
        store.write_text("".join(lines))
        config += [
            ("credential.helper", ""),  # no helper of the host's configuration
            ("credential.helper", f"store --file={shlex.quote(str(store))}"),
            ("credential.useHttpPath", "true"),
        ]
    keys = [c for c in chosen if c.ssh_key_file is not None]
    if keys:
        known = private / "known_hosts"
        argv = ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known}"]  # fmt: skip
        hosts = []
        for n, credential in enumerate(keys):
            key_file, known_hosts = credential.ssh_key_file, credential.known_hosts_file
            if key_file is None or known_hosts is None:
                continue
            try:
                hosts.append(known_hosts.read_text())
                # ssh refuses a key others can read (a mounted Secret is 0644 by default).
                key = private / f"key-{n}"
                key.touch(mode=0o600)
                key.write_bytes(key_file.read_bytes())
            except OSError as exc:
                log.error("ssh key of %s unreadable: %s", credential.url, exc.strerror)
                continue
            argv += ["-i", str(key)]
        known.write_text("".join(hosts))
        env["GIT_SSH_COMMAND"] = shlex.join(argv)
    env["GIT_CONFIG_COUNT"] = str(len(config))
    for n, (name, value) in enumerate(config):
        env[f"GIT_CONFIG_KEY_{n}"] = name
        env[f"GIT_CONFIG_VALUE_{n}"] = value
    return env
