"""A push delivery exactly as GitHub sends one: JSON body, `X-GitHub-Delivery` as the
idempotency key, `X-Hub-Signature-256: sha256=<hex HMAC-SHA256(secret, body)>`."""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from typing import Any

import aiohttp

from niphas_demo.layout import REPO_NAME


def push_payload(clone_url: str, before: str, after: str) -> dict[str, Any]:
    return {
        "ref": "refs/heads/main",
        "before": before,
        "after": after,
        "created": before == "0" * 40,
        "deleted": False,
        "forced": False,
        "commits": [],
        "head_commit": None,
        "repository": {
            "name": REPO_NAME.split("/")[1],
            "full_name": REPO_NAME,
            "clone_url": clone_url,
            "default_branch": "main",
        },
        "pusher": {"name": "demo", "email": "demo@niphas.invalid"},
        "sender": {"login": "demo"},
    }


async def send_push(
    url: str, secret: str, clone_url: str, before: str, after: str, delivery: str | None = None
) -> tuple[int, dict[str, Any]]:
    """POST the signed delivery; returns the ingress's status and JSON answer. A forge that
    re-sends a delivery keeps its `delivery` id (the ingress's idempotency key)."""
    body = json.dumps(push_payload(clone_url, before, after)).encode()
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "GitHub-Hookshot/niphas-demo",
        "X-GitHub-Event": "push",
        "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
        "X-Hub-Signature-256": f"sha256={digest}",
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers=headers) as response,
    ):
        answer = await response.json(content_type=None)
        return response.status, answer if isinstance(answer, dict) else {}
