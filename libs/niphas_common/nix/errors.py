"""The Nix layer's error hierarchy.

Parsers and clients translate every low-level failure (struct errors, bad base64, OS errors
while unpacking, HTTP errors) into one of these, so callers catch `NixError` and nothing else.
"""

from __future__ import annotations


class NixError(Exception):
    """Base class of every error raised by `niphas_common.nix`."""


class StorePathError(NixError, ValueError):
    """A string is not a valid store path (or store path name) for the store dir in use."""


class HashError(NixError, ValueError):
    """A hash string cannot be parsed, or has the wrong algorithm or length."""


class NarError(NixError):
    """A NAR stream is malformed, unsafe to unpack, truncated, or over a limit."""


class NarinfoError(NixError):
    """A .narinfo document is malformed or misses a required field."""


class SignatureError(NixError):
    """A key is malformed, or a signature is missing, malformed or does not verify."""


class VerificationError(NixError):
    """Downloaded data does not match what its (signed) narinfo promises."""


class CacheError(NixError):
    """A binary cache cannot be reached or answered something unusable."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        """The HTTP status the cache answered with, when it answered."""


class CommandError(NixError):
    """A nix CLI command failed; carries the command, exit status and stderr."""

    def __init__(
        self, cmd: list[str], returncode: int | None, stderr: str, message: str = ""
    ) -> None:
        self.cmd = cmd
        self.returncode = returncode
        self.stderr = stderr
        tail = stderr.strip()[-2000:]  # the end of nix's stderr holds the actual error
        head = message or f"exit status {returncode}"
        super().__init__(f"`{' '.join(cmd)}` failed: {head}" + (f"\n{tail}" if tail else ""))


class CommandTimeout(CommandError):
    """A nix CLI command ran longer than its timeout and was killed."""
