"""GitHub (github.com and GitHub Enterprise Server).

- Event `X-GitHub-Event` (`push`, `ping`, ...), delivery `X-GitHub-Delivery` (a GUID that a
  redelivery keeps);
- `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the raw body keyed by the secret>`; the
  legacy SHA-1 `X-Hub-Signature` is not accepted;
- body JSON, or a form body with the JSON in its `payload` field (both are signed raw);
- push: `ref`, `before`, `after`, `deleted`, `repository.{clone_url, full_name, html_url,
  ssh_url}`, `pusher.name`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from niphas_eval.forges.base import (
    Action,
    ForgeAdapter,
    ForgeName,
    Ignored,
    Ping,
    WebhookRejected,
    header,
    hmac_sha256_hex,
    same_secret,
    text,
)

SIGNATURE_HEADER = "X-Hub-Signature-256"


class GitHub(ForgeAdapter):
    family = "github"
    event_headers = ("X-GitHub-Event",)
    delivery_headers = ("X-GitHub-Delivery",)

    def forge(self, headers: Mapping[str, str]) -> ForgeName:
        return "github"

    def repository_keys(self, payload: Mapping[str, Any]) -> list[str]:
        repo = payload.get("repository")
        if not isinstance(repo, Mapping):
            return []
        keys = (repo.get(k) for k in ("clone_url", "full_name", "html_url", "ssh_url", "git_url"))
        return [k for k in keys if isinstance(k, str) and k]

    def clone_url(self, payload: Mapping[str, Any]) -> str | None:
        repo = payload.get("repository")
        return text(repo.get("clone_url")) if isinstance(repo, Mapping) else None

    def proof(self, headers: Mapping[str, str]) -> str:
        given = header(headers, SIGNATURE_HEADER)
        if given is None:
            raise WebhookRejected(401, f"missing {SIGNATURE_HEADER}")
        return given

    def proves(self, proof: str, body: bytes, secret: str) -> bool:
        return same_secret(proof, "sha256=" + hmac_sha256_hex(secret, body))

    def action(self, event: str, payload: Mapping[str, Any]) -> Action:
        if event == "ping":
            return Ping()
        if event != "push":
            return Ignored(f"event {event!r} is not evaluated (only push)")
        pusher = payload.get("pusher")
        name = text(pusher.get("name")) if isinstance(pusher, Mapping) else None
        return self.push_fields(payload, pusher=name)
