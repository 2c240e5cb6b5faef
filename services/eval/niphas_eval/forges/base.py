"""What every forge's webhook adapter provides, and what it can answer.

An adapter reads one forge's headers and payloads: which event, which delivery, the proof
the request carries (a signature or token header, read before the body), whether that proof
matches a secret, and, only once it does, what the payload names (its repository) and asks
for (a push to evaluate, a ping, or something ignored with a reason).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar, Literal
from urllib.parse import parse_qs

from pydantic_core import from_json

ZERO_COMMIT = "0" * 40

ForgeName = Literal["github", "gitea", "forgejo", "gitlab"]


class WebhookRejected(Exception):
    """A request we refuse, with the HTTP status to answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class PushFields:
    """What a push delivery says, before it becomes a `PushReceived`."""

    ref: str
    before: str | None
    after: str
    pusher: str | None


@dataclass(frozen=True)
class Ping:
    """The forge checking that the hook works."""


@dataclass(frozen=True)
class Ignored:
    reason: str


Action = PushFields | Ping | Ignored


def hmac_sha256_hex(secret: str, body: bytes) -> str:
    mac = _keyed(secret).copy()
    mac.update(body)
    return mac.hexdigest()


@lru_cache(maxsize=256)
def _keyed(secret: str) -> hmac.HMAC:
    """An HMAC-SHA256 keyed by `secret` with nothing hashed yet: copied per body, so the key
    is prepared once per secret (thread-safe: copy() takes the hash object's lock)."""
    return hmac.new(secret.encode(), digestmod=hashlib.sha256)


def same_secret(given: str, expected: str) -> bool:
    """Constant-time comparison of two secrets or digests."""
    return hmac.compare_digest(given.encode(), expected.encode())


def header(headers: Mapping[str, str], *names: str) -> str | None:
    """The first of `names` present (case-insensitive mapping) and non-empty."""
    for name in names:
        value = headers.get(name)
        if value:
            return value.strip()
    return None


def is_zero(commit: str | None) -> bool:
    return commit is not None and commit.strip("0") == ""


def text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


class ForgeAdapter:
    """One forge family's webhook dialect (one endpoint: /hooks/<family>)."""

    family: ClassVar[str]
    signs_body: ClassVar[bool] = True
    """False when the proof is a token that does not depend on the body (checked before it
    is read)."""
    event_headers: ClassVar[tuple[str, ...]]
    delivery_headers: ClassVar[tuple[str, ...]]

    def forge(self, headers: Mapping[str, str]) -> ForgeName:
        """The forge that sent this request (Gitea and Forgejo share an endpoint)."""
        raise NotImplementedError

    def event(self, headers: Mapping[str, str]) -> str:
        value = header(headers, *self.event_headers)
        if value is None:
            raise WebhookRejected(400, f"missing {self.event_headers[0]} header")
        return value

    def delivery_id(self, headers: Mapping[str, str]) -> str:
        value = header(headers, *self.delivery_headers)
        if value is None:
            raise WebhookRejected(400, f"missing {self.delivery_headers[0]} header")
        if len(value) > 255:
            raise WebhookRejected(400, "delivery id longer than 255 characters")
        return value

    def payload(self, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
        """The JSON body (or a form body's `payload` field, as GitHub can send)."""
        content_type = (headers.get("Content-Type") or "").split(";")[0].strip().lower()
        raw: bytes | str = body
        if content_type == "application/x-www-form-urlencoded":
            try:
                fields = parse_qs(body.decode(), strict_parsing=True)
            except (UnicodeDecodeError, ValueError):
                raise WebhookRejected(400, "malformed form body") from None
            if len(fields.get("payload", [])) != 1:
                raise WebhookRejected(400, "form body without a single `payload` field")
            raw = fields["payload"][0]
        try:
            # pydantic's JSON parser: 2-3x the speed of json.loads on a push; UTF-8 only, as
            # every forge sends; it stops at 200 levels of nesting.
            data = from_json(raw)
        except ValueError as exc:
            if str(exc).startswith("recursion limit exceeded"):
                raise WebhookRejected(400, "JSON nested too deeply") from None
            raise WebhookRejected(400, f"malformed JSON: {str(exc)[:200]}") from None
        if not isinstance(data, dict):
            raise WebhookRejected(400, "the payload is not a JSON object")
        return data

    def repository_keys(self, payload: Mapping[str, Any]) -> list[str]:
        """Names the payload gives its repository, most specific first (clone URL first)."""
        raise NotImplementedError

    def clone_url(self, payload: Mapping[str, Any]) -> str | None:
        raise NotImplementedError

    def proof(self, headers: Mapping[str, str]) -> str:
        """The signature or token the request carries (401 when it carries none); read from
        the headers alone, before the body."""
        raise NotImplementedError

    def proves(self, proof: str, body: bytes, secret: str) -> bool:
        """Whether `proof` shows the sender knows `secret` (for this exact body)."""
        raise NotImplementedError

    def action(self, event: str, payload: Mapping[str, Any]) -> Action:
        """What a verified delivery asks for."""
        raise NotImplementedError

    @staticmethod
    def push_fields(
        payload: Mapping[str, Any], *, pusher: str | None, after_key: str = "after"
    ) -> Action:
        ref = text(payload.get("ref"))
        after = text(payload.get(after_key))
        if ref is None or after is None:
            raise WebhookRejected(400, "push payload without `ref` and `after`")
        if is_zero(after) or payload.get("deleted") is True:
            return Ignored(f"{ref} was deleted: nothing to evaluate")
        before = text(payload.get("before"))
        return PushFields(ref, None if is_zero(before) else before, after, pusher)
