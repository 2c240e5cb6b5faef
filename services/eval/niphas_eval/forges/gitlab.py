"""GitLab (gitlab.com and self-managed).

- Event `X-Gitlab-Event` (`Push Hook`, `Tag Push Hook`, `System Hook`, ...);
- authentication: `X-Gitlab-Token` carries the secret token itself (compared in constant
  time); GitLab does not sign the body;
- delivery id: `Idempotency-Key` when sent (GitLab keeps it across retries of one delivery),
  else `X-Gitlab-Event-UUID`, else `X-Gitlab-Webhook-UUID`;
- push (`object_kind` `push` or `tag_push`): `ref`, `before`, `after`, `user_username`,
  `project.{git_http_url, git_ssh_url, path_with_namespace, web_url}`. Deleting a branch sends
  a push whose `after` is all zeros.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from niphas_eval.forges.base import (
    Action,
    ForgeAdapter,
    ForgeName,
    Ignored,
    WebhookRejected,
    header,
    same_secret,
    text,
)

TOKEN_HEADER = "X-Gitlab-Token"
PUSH_EVENTS = ("Push Hook", "Tag Push Hook", "System Hook")


class GitLab(ForgeAdapter):
    family = "gitlab"
    signs_body = False
    event_headers = ("X-Gitlab-Event",)
    delivery_headers = ("Idempotency-Key", "X-Gitlab-Event-UUID", "X-Gitlab-Webhook-UUID")

    def forge(self, headers: Mapping[str, str]) -> ForgeName:
        return "gitlab"

    @staticmethod
    def _project(payload: Mapping[str, Any]) -> Mapping[str, Any]:
        for name in ("project", "repository"):
            value = payload.get(name)
            if isinstance(value, Mapping) and value.get("git_http_url"):
                return value
        return {}

    def repository_keys(self, payload: Mapping[str, Any]) -> list[str]:
        project = self._project(payload)
        names = ("git_http_url", "path_with_namespace", "web_url", "git_ssh_url")
        keys = (project.get(k) for k in names)
        return [k for k in keys if isinstance(k, str) and k]

    def clone_url(self, payload: Mapping[str, Any]) -> str | None:
        return text(self._project(payload).get("git_http_url"))

    def proof(self, headers: Mapping[str, str]) -> str:
        given = header(headers, TOKEN_HEADER)
        if given is None:
            raise WebhookRejected(401, f"missing {TOKEN_HEADER}")
        return given

    def proves(self, proof: str, body: bytes, secret: str) -> bool:
        return same_secret(proof, secret)

    def action(self, event: str, payload: Mapping[str, Any]) -> Action:
        kind = payload.get("object_kind")
        if event not in PUSH_EVENTS or kind not in ("push", "tag_push"):
            return Ignored(f"event {event!r} ({kind!r}) is not evaluated (only pushes)")
        return self.push_fields(payload, pusher=text(payload.get("user_username")))
