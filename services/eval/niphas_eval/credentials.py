"""Per-repository credentials for fetching private flakes and their git inputs.

A YAML (or JSON) file, `NIPHAS_EVAL_GIT_CREDENTIALS_FILE` (in a cluster: a mounted Secret),
maps a repository URL, or a URL prefix ending in `/`, to how to reach it (the format and its
parser live in `niphas_common.repo_credentials`, which the reporter reads too):

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
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

from niphas_common.repo_credentials import (
    DEFAULT_USERNAME,
    CredentialsError,
    CredentialsFile,
    RepositoryCredential,
    parse_credentials,
)

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_USERNAME",
    "CredentialsError",
    "GitCredentials",
    "RepositoryCredential",
    "parse_credentials",
]


class GitCredentials(CredentialsFile):
    """The credentials file (`niphas_common.repo_credentials`), re-read when it changes,
    turned into git's environment for one evaluation."""

    def __init__(self, file: Path | None) -> None:
        super().__init__(file, log)

    @classmethod
    def from_entries(cls, entries: Iterable[RepositoryCredential]) -> GitCredentials:
        credentials = cls(None)
        credentials.replace(entries)
        return credentials

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
