"""A binary cache's upload token, handed to `nix` without ever being on a command line.

Nix sends the credentials its `netrc-file` holds for a host as HTTP basic auth (on every
request to that host, uploads included), so the token goes into a netrc (mode 0600, written
whole) and the runner gets `--option netrc-file`: only a path appears in an argument or a log.
The token file is read at each use, so a rotated Secret applies at once.
"""

from __future__ import annotations

import os
from pathlib import Path


class UploadTokenError(ValueError):
    """The token file cannot be used (the message names it, never the token)."""


def read_upload_token(token_file: Path) -> str:
    try:
        token = token_file.read_text().strip()
    except OSError as exc:
        raise UploadTokenError(
            f"cache upload token {token_file} unreadable ({exc.strerror}): create the Secret "
            "niphas-cache-upload (key token)"
        ) from exc
    if not token or any(c.isspace() for c in token):
        raise UploadTokenError(f"cache upload token {token_file}: empty or containing white space")
    return token


def write_netrc(netrc: Path, host: str, token: str) -> None:
    """`netrc` naming `token` for `host`, created 0600 and renamed into place."""
    netrc.parent.mkdir(parents=True, exist_ok=True)
    tmp = netrc.with_name(f".{netrc.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"machine {host} login niphas password {token}\n")
    os.replace(tmp, netrc)
