"""The environment and options every `nix eval` of pushed code runs with.

Environment: built from nothing, not inherited. The worker's own environment holds the NATS
password and whatever cloud credentials the pod has; Nix passes its environment on to
fixed-output builders that name variables in `impureEnvVars` (reachable through
import-from-derivation) and to `git`. So nix gets only what it needs to run and fetch:
`PATH`, a private `HOME` (Nix's fetcher and evaluation caches; no user nix.conf, registry or
.gitconfig credentials), `TMPDIR`, `GIT_TERMINAL_PROMPT=0` (never wait for a password), and the
pass-through variables named in `PASSED`: Nix's own configuration, TLS trust roots, egress
proxies and the ssh command for private repositories. Nothing named NIPHAS_*, NATS_*, AWS_*...
reaches it.

Options (besides the operator's nix.conf / NIX_CONFIG, which they override on the command
line): `allow-import-from-derivation` (off unless NIPHAS_EVAL_ALLOW_IMPORT_FROM_DERIVATION:
with it, evaluation runs builders on the worker), `restrict-eval` with `allowed-uris` from the
allowlist (fetches made by evaluation itself, `builtins.fetchurl`/`fetchTarball`/`fetchGit`
even with a hash, go only to allowlisted prefixes), `pure-eval` (already the default for
flakes: no absolute paths, no `getEnv`, no `currentSystem`), `flake-registry` empty (no
download of the global registry: indirect inputs are refused anyway).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

PASSED = (
    "NIX_CONFIG", "NIX_CONF_DIR", "NIX_USER_CONF_FILES", "NIX_REMOTE", "NIX_STORE_DIR",
    "NIX_STATE_DIR", "NIX_LOG_DIR", "NIX_DAEMON_SOCKET_PATH", "NIX_SSL_CERT_FILE",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "GIT_SSL_CAINFO", "GIT_SSH_COMMAND",
    "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
    "ALL_PROXY", "all_proxy", "LANG", "LC_ALL", "TZ",
)  # fmt: skip
"""Variables passed through from the worker's environment when set: configuration of Nix,
TLS and egress that an operator sets for fetching, never credentials of the platform."""
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


def nix_environment(home: Path, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The whole environment of nix (and git, prlimit) for evaluating pushed code."""
    source = os.environ if environ is None else environ
    tmp = home / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": source.get("PATH") or DEFAULT_PATH,
        "HOME": str(home),
        "TMPDIR": str(tmp),
        "GIT_TERMINAL_PROMPT": "0",
    }
    env.update({name: source[name] for name in PASSED if name in source})
    return env


def eval_options(allowed_uris: Sequence[str], *, allow_ifd: bool) -> dict[str, str]:
    """`--option` pairs for every nix eval of pushed code."""
    return {
        "allow-import-from-derivation": "true" if allow_ifd else "false",
        "pure-eval": "true",
        "restrict-eval": "true",
        "allowed-uris": " ".join(allowed_uris),
        "flake-registry": "",
        # A build that cannot be sandboxed (IFD on a host without user namespaces) fails
        # instead of silently running unsandboxed.
        "sandbox-fallback": "false",
    }
