"""How the builder starts the nix process that runs untrusted builds.

Two things keep a pushed derivation away from the builder's secrets:
- Nix's sandbox, forced on the command line (`sandbox = true`) whatever nix.conf or
  NIX_CONFIG say, with `sandbox-fallback = false`: Nix's default silently builds *without* the
  sandbox when it cannot set one up, and a build that cannot be sandboxed must fail instead.
  Inside it a build sees only its inputs, a private /tmp and /proc (its own PID namespace),
  a read-only store and no network; only fixed-output derivations keep the host's network
  (their output is checked against the declared hash).
- a minimal, explicit environment for that nix process: a fixed-output derivation's
  `impureEnvVars` are read from the environment of the nix process (single-user mode), so
  NATS, cloud and forge credentials in the builder's own environment must not be in it.
The push afterwards (which needs the cache's credentials) runs with the builder's own runner.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from niphas_common.nix.runner import NixRunner

SANDBOX_OPTIONS: Mapping[str, str] = {"sandbox": "true", "sandbox-fallback": "false"}

PASSED_VARIABLES = (
    "PATH",
    "LANG",
    "LC_ALL",
    "TZ",
    "TMPDIR",
    # Nix's own configuration (where nix.conf is, extra settings, the store).
    "NIX_CONF_DIR",
    "NIX_USER_CONF_FILES",
    "NIX_CONFIG",
    "NIX_REMOTE",
    "NIX_STORE_DIR",
    "NIX_STATE_DIR",
    "NIX_LOG_DIR",
    # Fixed-output fetches: certificates and the fetch proxies an operator declares.
    "NIX_SSL_CERT_FILE",
    "SSL_CERT_FILE",
    "http_proxy",
    "https_proxy",
    "ftp_proxy",
    "all_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
)
"""Variables passed from the builder's environment to the building nix, by exact name: an
allowlist, so a secret added to the builder's environment later stays out by default."""

SANDBOX_FAILURE_HINTS = (
    "sandbox",
    "cloning builder process",
    "unable to mount",
    "mounting /proc",
    "setting up a private mount namespace",
)
"""Fragments of Nix's errors when it cannot set up the sandbox (namespaces or mounts refused)."""


def build_environment(home: Path, source: Mapping[str, str] | None = None) -> dict[str, str]:
    """The whole environment of the nix process that builds: allowlisted variables, and a
    HOME of the builder's own (Nix keeps its caches there) instead of the user's."""
    env = os.environ if source is None else source
    result = {name: env[name] for name in PASSED_VARIABLES if name in env}
    result.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    result["HOME"] = str(home)
    return result


def sandboxed_runner(store: str | None, home: Path) -> NixRunner:
    """A runner for untrusted builds: sandbox forced on, no fallback, minimal environment."""
    home.mkdir(parents=True, exist_ok=True)
    return NixRunner(
        store=store,
        options=SANDBOX_OPTIONS,
        env=build_environment(home),
        inherit_env=False,
    )


def sandbox_unavailable(log: str) -> bool:
    """Whether a failed build's log says Nix could not set up its sandbox (as opposed to the
    build itself failing)."""
    head = "\n".join(line for line in log.splitlines() if line.startswith("error:")).lower()
    return any(hint in head for hint in SANDBOX_FAILURE_HINTS)
