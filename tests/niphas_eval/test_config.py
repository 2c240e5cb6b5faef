"""Configuration pieces without servers: the secrets file format (YAML/JSON, env, rotation,
refusals), the deny-by-default allowlist, and the
settings' parsing of lists from the environment."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from niphas_eval.evaluator import tail
from niphas_eval.flakeref import Allowlist
from niphas_eval.forges.base import same_secret
from niphas_eval.secrets import SecretsError, WebhookSecrets
from niphas_eval.settings import EvalSettings


def test_secrets_file_lookup_by_url_or_full_name_per_forge(tmp_path: Path) -> None:
    path = tmp_path / "secrets.yaml"
    path.write_text(
        "acme/app:\n  forge: github\n  secret: one\n"
        "'https://git.example/acme/site.git':\n  forge: forgejo\n  secret: two\n"
        "  clone_url: ssh://git@git.example/acme/site.git\n"
    )
    secrets = WebhookSecrets(path)
    assert secrets.lookup(["https://github.example/acme/app.git", "acme/app"], "github")
    # Case, trailing slash and .git do not matter; the endpoint family does.
    site = secrets.lookup(["HTTPS://git.example/acme/site/"], "gitea")
    assert site is not None and site.secret == "two" and site.forge == "forgejo"
    assert site.clone_url == "ssh://git@git.example/acme/site.git"
    assert secrets.lookup(["acme/app"], "gitlab") is None
    assert secrets.lookup(["acme/unknown"], "github") is None
    assert "two" not in repr(site)


def test_secrets_file_is_reread_when_it_changes_and_env_entries_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("API_HOOK_TOKEN", "from-env-var")
    path = tmp_path / "secrets.json"
    path.write_text(json.dumps({"acme/app": {"forge": "github", "secret": "old"}}))
    env_json = json.dumps({"acme/api": {"forge": "gitlab", "secret_env": "API_HOOK_TOKEN"}})
    secrets = WebhookSecrets(path, env_json)
    assert secrets.lookup(["acme/app"], "github").secret == "old"  # type: ignore[union-attr]
    assert secrets.lookup(["acme/api"], "gitlab").secret == "from-env-var"  # type: ignore[union-attr]

    path.write_text(json.dumps({"acme/app": {"forge": "github", "secret": "rotated!"}}))
    os.utime(path, ns=(1, 10**18))
    assert secrets.lookup(["acme/app"], "github").secret == "rotated!"  # type: ignore[union-attr]
    path.write_text("acme/app: [not, a, mapping")  # a bad edit keeps the last good entries
    os.utime(path, ns=(1, 2 * 10**18))
    assert secrets.lookup(["acme/app"], "github").secret == "rotated!"  # type: ignore[union-attr]


def test_entries_without_a_secret_are_refused_and_bad_files_rejected() -> None:
    secrets = WebhookSecrets.from_mapping(
        {"a/empty": {"forge": "github", "secret": ""}, "a/unset": {"forge": "github",
                                                                 "secret_env": "NOPE_UNSET"}}
    )  # fmt: skip
    assert secrets.lookup(["a/empty"], "github") is None
    assert secrets.lookup(["a/unset"], "github") is None
    with pytest.raises(SecretsError, match="forge must be one of"):
        WebhookSecrets.from_mapping({"a/b": {"forge": "bitbucket", "secret": "x"}})
    with pytest.raises(SecretsError, match="unknown fields"):
        WebhookSecrets.from_mapping({"a/b": {"forge": "github", "secret": "x", "token": "y"}})


def test_constant_time_compare() -> None:
    assert same_secret("abc", "abc")
    assert not same_secret("abc", "abd")
    assert not same_secret("abc", "abcd")


def test_allowlist_denies_by_default_and_matches_globs() -> None:
    assert not Allowlist(()).allows("https://git.example/acme/app.git")
    allow = Allowlist(("https://git.example/acme/*", "git+ssh://git@git.example/ops/*"))
    assert allow.allows("https://git.example/acme/app.git")
    assert not allow.allows("https://git.example/evil/app.git")
    assert not allow.allows("https://git.example/acme/../evil/app.git")
    assert allow.allows("git@git.example:ops/infra.git")  # via its flake ref
    assert not allow.allows("https://GIT.example/acme/app.git")  # case-sensitive
    assert "deny by default" in Allowlist(()).reason("x")


def test_settings_read_lists_and_state_dir_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NIPHAS_EVAL_ALLOWED_REFS", "https://a/*, file:///srv/*")
    monkeypatch.setenv("NIPHAS_STATE_DIR", "/var/lib/niphas")
    settings = EvalSettings()
    assert settings.allowed_refs == ["https://a/*", "file:///srv/*"]
    assert settings.state_dir == Path("/var/lib/niphas")
    assert (settings.listen_host, settings.listen_port) == ("127.0.0.1", 8470)
    assert EvalSettings(listen="[::]:9000").listen_host == "::"


def test_stderr_tail_drops_lock_chatter_and_keeps_the_end() -> None:
    stderr = (
        "warning: not writing modified lock file of flake 'path:/x':\n"
        "• Added input 'target':\n    'git+file:///r?rev=1'\n"
        "error: syntax error, unexpected ';'\n" + "x" * 5000
    )
    kept = tail(stderr, 1000)
    assert "lock file" not in kept and "Added input" not in kept
    assert len(kept.encode()) <= 1003 and kept.startswith("...")
    assert tail("error: boom", 1000) == "error: boom"


def test_secrets_file_that_appears_later_is_picked_up(tmp_path: Path) -> None:
    path = tmp_path / "mounted" / "secrets.yaml"
    secrets = WebhookSecrets(path)  # an optional Secret not created yet
    assert secrets.lookup(["acme/app"], "github") is None
    assert len(secrets) == 0
    path.parent.mkdir()
    path.write_text("acme/app: {forge: github, secret: now}\n")
    assert secrets.lookup(["acme/app"], "github").secret == "now"  # type: ignore[union-attr]


def test_candidates_follow_the_secrets_file(tmp_path: Path) -> None:
    """The entries an endpoint checks a delivery against are kept between deliveries, and
    dropped when the file changes or goes away (a rotated or deleted Secret)."""
    path = tmp_path / "secrets.yaml"
    path.write_text("acme/app: {forge: github, secret: old}\n")
    env_json = json.dumps({"acme/site": {"forge": "github", "secret": "env"}})
    secrets = WebhookSecrets(path, env_json)
    assert sorted(c.secret for c in secrets.candidates("github")) == ["env", "old"]
    assert secrets.candidates("gitea") == []

    path.write_text("acme/app: {forge: github, secret: rotated}\n")
    os.utime(path, ns=(1, 10**18))
    assert sorted(c.secret for c in secrets.candidates("github")) == ["env", "rotated"]
    path.write_text("acme/app: {forge: gitea, secret: moved}\n")
    os.utime(path, ns=(1, 2 * 10**18))
    assert [c.secret for c in secrets.candidates("github")] == ["env"]
    assert [c.secret for c in secrets.candidates("gitea")] == ["moved"]

    path.unlink()
    assert [c.secret for c in secrets.candidates("github")] == ["env"]
    assert secrets.candidates("gitea") == []
