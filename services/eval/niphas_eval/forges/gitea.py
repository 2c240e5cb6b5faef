"""Gitea and Forgejo (one endpoint: Forgejo keeps Gitea's webhook format).

- Event `X-Gitea-Event` / `X-Forgejo-Event`, delivery `X-Gitea-Delivery` /
  `X-Forgejo-Delivery` (both also send GitHub- and Gogs-style copies of these headers);
- `X-Gitea-Signature` / `X-Forgejo-Signature`: the hex HMAC-SHA256 of the raw body keyed by
  the secret (no prefix); newer versions add GitHub's `X-Hub-Signature-256`, accepted too;
- push: `ref`, `before`, `after`, `repository.{clone_url, full_name, html_url, ssh_url}`,
  `pusher.{login, username}`. Deleting a branch sends a push whose `after` is all zeros.
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


class Gitea(ForgeAdapter):
    family = "gitea"
    event_headers = ("X-Gitea-Event", "X-Forgejo-Event")
    delivery_headers = ("X-Gitea-Delivery", "X-Forgejo-Delivery")

    def forge(self, headers: Mapping[str, str]) -> ForgeName:
        forgejo = ("X-Forgejo-Event", "X-Forgejo-Delivery", "X-Forgejo-Signature")
        return "forgejo" if header(headers, *forgejo) else "gitea"

    def repository_keys(self, payload: Mapping[str, Any]) -> list[str]:
        repo = payload.get("repository")
        if not isinstance(repo, Mapping):
            return []
        keys = (repo.get(k) for k in ("clone_url", "full_name", "html_url", "ssh_url"))
        return [k for k in keys if isinstance(k, str) and k]

    def clone_url(self, payload: Mapping[str, Any]) -> str | None:
        repo = payload.get("repository")
        return text(repo.get("clone_url")) if isinstance(repo, Mapping) else None

    def proof(self, headers: Mapping[str, str]) -> str:
        given = header(headers, "X-Forgejo-Signature", "X-Gitea-Signature")
        if given is not None:
            return given.lower()
        hub = header(headers, "X-Hub-Signature-256")
        if hub is None:
            raise WebhookRejected(401, "missing X-Gitea-Signature (or X-Forgejo-Signature)")
        return hub.lower().removeprefix("sha256=")

    def proves(self, proof: str, body: bytes, secret: str) -> bool:
        return same_secret(proof, hmac_sha256_hex(secret, body))

    def action(self, event: str, payload: Mapping[str, Any]) -> Action:
        if event == "ping":
            return Ping()
        if event != "push":
            return Ignored(f"event {event!r} is not evaluated (only push)")
        pusher = payload.get("pusher")
        name = None
        if isinstance(pusher, Mapping):
            name = text(pusher.get("login")) or text(pusher.get("username"))
        return self.push_fields(payload, pusher=name)
