"""The webhook ingress against a real nats-server, over HTTP on loopback: deliveries built in
each forge's documented format and signed as that forge signs them become exactly one
`push.received`; unauthenticated, unknown, oversized or malformed requests are refused with
nothing published; redeliveries are stored once; pings, branch deletions and other events
are acknowledged and ignored; a stopped bus answers 503 quickly."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import time
from urllib.parse import urlencode

import aiohttp
import pytest

from niphas_common.bus.bus import Bus
from niphas_common.nats_server import EmbeddedNats
from tests.niphas_eval.conftest import (
    Delivery,
    Ingress,
    gitea_push,
    github_ping,
    github_push,
    gitlab_push,
    pushes,
    serve_ingress,
)

A = "a" * 40
B = "b" * 40
CLONE = "https://github.example/acme/app.git"


def resigned(delivery: Delivery, body: bytes, secret: str = "github-secret") -> Delivery:
    """`delivery` (GitHub) with another body, signed with `secret`."""
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return Delivery(
        delivery.path, {**delivery.headers, "X-Hub-Signature-256": f"sha256={digest}"}, body
    )


async def stored(bus: Bus) -> int:
    info = await bus.js.stream_info("PUSH_RECEIVED")
    return int(info.state.messages)


async def test_github_push_becomes_one_push_received(ingress: Ingress, bus: Bus) -> None:
    delivery = github_push("github-secret", clone_url=CLONE, before=A, after=B)
    status, body = await ingress.send(delivery)

    assert status == 202, body
    assert body["status"] == "accepted"
    [push] = await pushes(bus)
    assert push.forge == "github"
    assert push.repository == CLONE
    assert (push.ref, push.before, push.commit) == ("refs/heads/main", A, B)
    assert push.pusher == "octocat"
    assert body["delivery"] == delivery.headers["X-GitHub-Delivery"]
    assert push.delivery_id.startswith("push-")  # what the push means: see test_ingress_trust
    assert push.event_id == body["event_id"]


async def test_github_form_encoded_push_is_accepted(ingress: Ingress, bus: Bus) -> None:
    json_delivery = github_push(None, clone_url=CLONE, after=B)
    body = urlencode({"payload": json_delivery.body.decode()}).encode()
    digest = hmac.new(b"github-secret", body, hashlib.sha256).hexdigest()
    headers = {
        **json_delivery.headers,
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Hub-Signature-256": f"sha256={digest}",
    }
    status, _ = await ingress.send(Delivery("/hooks/github", headers, body))
    assert status == 202
    assert [p.commit for p in await pushes(bus)] == [B]


@pytest.mark.parametrize("forgejo", [False, True], ids=["gitea", "forgejo"])
async def test_gitea_and_forgejo_pushes_are_accepted(
    ingress: Ingress, bus: Bus, forgejo: bool
) -> None:
    name, secret = (
        ("acme/forgejo-site", "forgejo-secret") if forgejo else ("acme/site", "gitea-secret")
    )
    clone = f"https://gitea.example/{name}.git"
    delivery = gitea_push(
        secret, clone_url=clone, full_name=name, before=A, after=B, forgejo=forgejo
    )
    status, body = await ingress.send(delivery)

    assert status == 202, body
    [push] = await pushes(bus)
    assert push.forge == ("forgejo" if forgejo else "gitea")
    assert (push.repository, push.commit, push.pusher) == (clone, B, "gitea")
    vendor = "Forgejo" if forgejo else "Gitea"
    assert body["delivery"] == delivery.headers[f"X-{vendor}-Delivery"]


async def test_gitlab_push_is_accepted(ingress: Ingress, bus: Bus) -> None:
    clone = "https://gitlab.example/acme/api.git"
    delivery = gitlab_push("gitlab-token", clone_url=clone, before=A, after=B)
    status, body = await ingress.send(delivery)

    assert status == 202, body
    [push] = await pushes(bus)
    assert (push.forge, push.repository, push.commit, push.pusher) == ("gitlab", clone, B, "jsmith")
    assert body["delivery"] == delivery.headers["X-Gitlab-Event-UUID"]


async def test_same_delivery_three_times_is_one_event(ingress: Ingress, bus: Bus) -> None:
    deliveries = [
        github_push("github-secret", clone_url=CLONE, after=B, delivery="d-github-1"),
        gitea_push("gitea-secret", clone_url="https://gitea.example/acme/site.git", after=B,
                   delivery="d-gitea-1"),
        gitlab_push("gitlab-token", clone_url="https://gitlab.example/acme/api.git", after=B,
                    event_uuid="d-gitlab-1"),
    ]  # fmt: skip
    for delivery in deliveries:
        answers = [await ingress.send(delivery) for _ in range(3)]
        assert [status for status, _ in answers] == [202, 202, 202]
        assert [body["duplicate"] for _, body in answers] == [False, True, True]
    assert await stored(bus) == 3
    assert sorted(p.forge for p in await pushes(bus)) == ["gitea", "github", "gitlab"]


async def test_refused_requests_publish_nothing(ingress: Ingress, bus: Bus) -> None:
    good = github_push("github-secret", clone_url=CLONE, after=B)
    wrong_signature = github_push("not-the-secret", clone_url=CLONE, after=B)
    unsigned = github_push(None, clone_url=CLONE, after=B)
    tampered = Delivery(good.path, good.headers, good.body.replace(B.encode(), A.encode()))
    unknown_repo = github_push(
        "github-secret", clone_url="https://github.example/evil/x.git", full_name="evil/x", after=B
    )
    no_secret = github_push(
        "", clone_url="https://github.example/acme/nosecret.git", full_name="acme/nosecret", after=B
    )
    # A GitLab token for a GitHub repository, or a Gitea signature at the GitLab endpoint.
    wrong_forge = gitlab_push(
        "github-secret", clone_url=CLONE, path_with_namespace="acme/app", after=B
    )
    gitea_wrong = gitea_push(
        "gitea-secret-nope", clone_url="https://gitea.example/acme/site.git", after=B
    )
    gitea_unsigned = gitea_push(None, clone_url="https://gitea.example/acme/site.git", after=B)
    gitlab_wrong = gitlab_push("nope", clone_url="https://gitlab.example/acme/api.git", after=B)
    gitlab_missing = gitlab_push(None, clone_url="https://gitlab.example/acme/api.git", after=B)
    # Garbage is parsed only once signed (unsigned garbage is a 401, below).
    malformed = resigned(good, b'{"ref": "refs/heads/main", ')
    not_object = resigned(good, b"[1, 2, 3]")
    oversized = Delivery(good.path, good.headers, b" " * (100 * 1024) + good.body)
    no_event = Delivery(
        good.path, {k: v for k, v in good.headers.items() if k != "X-GitHub-Event"}, good.body
    )

    cases = {
        "wrong signature": (wrong_signature, 401),
        "missing signature": (unsigned, 401),
        "tampered body": (tampered, 401),
        "unknown repository": (unknown_repo, 403),
        "repository without secret": (no_secret, 401),
        "entry of another forge": (wrong_forge, 401),
        "gitea wrong signature": (gitea_wrong, 401),
        "gitea missing signature": (gitea_unsigned, 401),
        "gitlab wrong token": (gitlab_wrong, 401),
        "gitlab missing token": (gitlab_missing, 401),
        "malformed JSON": (malformed, 400),
        "JSON that is not an object": (not_object, 400),
        "oversized body": (oversized, 413),
        "no event header": (no_event, 400),
    }  # fmt: skip
    for name, (delivery, expected) in cases.items():
        status, body = await ingress.send(delivery)
        assert status == expected, f"{name}: {status} {body}"
        assert body["status"] == "rejected", name
    assert await stored(bus) == 0


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"ref": "refs/heads/main", ', "malformed JSON: EOF while parsing"),
        (b'{"ref": "\xff"}', "malformed JSON: invalid unicode"),
        (b'{"ref": ' + b"9" * 5000 + b"}", "malformed JSON: number out of range"),
        (b'{"a": ' * 5000 + b"1" + b"}" * 5000, "JSON nested too deeply"),
    ],
    ids=["truncated", "not-utf8", "huge-number", "deep"],
)
async def test_unparsable_signed_bodies_are_refused_naming_why(
    ingress: Ingress, bus: Bus, body: bytes, reason: str
) -> None:
    good = github_push("github-secret", clone_url=CLONE, after=B)
    status, answer = await ingress.send(resigned(good, body))
    assert (status, answer["status"]) == (400, "rejected"), answer
    assert answer["reason"].startswith(reason), answer
    assert await stored(bus) == 0


async def test_ping_deletion_and_other_events_are_acknowledged_and_ignored(
    ingress: Ingress, bus: Bus
) -> None:
    status, body = await ingress.send(github_ping("github-secret", clone_url=CLONE))
    assert (status, body["status"]) == (200, "ping")

    status, body = await ingress.send(github_ping("wrong", clone_url=CLONE))
    assert status == 401  # pings are authenticated like everything else

    deleted = github_push("github-secret", clone_url=CLONE, before=A, after="0" * 40)
    status, body = await ingress.send(deleted)
    assert (status, body["status"]) == (200, "ignored")
    assert "deleted" in body["reason"]

    gitea_deleted = gitea_push("gitea-secret", clone_url="https://gitea.example/acme/site.git",
                               before=A, after="0" * 40)  # fmt: skip
    status, body = await ingress.send(gitea_deleted)
    assert (status, body["status"]) == (200, "ignored")

    gitlab_deleted = gitlab_push("gitlab-token", clone_url="https://gitlab.example/acme/api.git",
                                 before=A, after="0" * 40)  # fmt: skip
    status, body = await ingress.send(gitlab_deleted)
    assert (status, body["status"]) == (200, "ignored")

    issue = github_push("github-secret", clone_url=CLONE, after=B, event="issues")
    status, body = await ingress.send(issue)
    assert (status, body["status"]) == (200, "ignored")
    assert "issues" in body["reason"]
    assert await stored(bus) == 0


async def test_unusable_push_fields_are_refused(ingress: Ingress, bus: Bus) -> None:
    status, body = await ingress.send(github_push("github-secret", clone_url=CLONE, after="xyz"))
    assert status == 400
    assert "commit" in body["reason"]
    assert await stored(bus) == 0


async def test_default_body_cap_is_githubs_25_mb(bus: Bus) -> None:
    from niphas_eval.settings import EvalSettings

    assert EvalSettings().max_body_bytes == 25 * 1024 * 1024


async def test_bus_stopped_answers_503_quickly_and_not_ready(
    ingress: Ingress, bus: Bus, nats_server: EmbeddedNats | None
) -> None:
    if nats_server is None:
        pytest.skip("needs a nats-server this test owns")
    async with ingress.http.get(ingress.url + "/readyz") as resp:
        assert resp.status == 200

    nats_server.kill()
    started = time.monotonic()
    status, body = await ingress.send(github_push("github-secret", clone_url=CLONE, after=B))
    assert status == 503, body
    assert time.monotonic() - started < 3.0  # bounded: the forge must not time out first
    async with ingress.http.get(ingress.url + "/readyz") as resp:
        assert resp.status == 503
        assert "NATS" in await resp.text()


@pytest.mark.parametrize(
    ("ours_s", "bus_s"), [(0.5, 30.0), (30.0, 0.5)], ids=["ours-shorter", "bus-shorter"]
)
async def test_an_ack_that_never_comes_answers_503_after_the_shorter_timeout(
    bus: Bus, nats_server: EmbeddedNats | None, ours_s: float, bus_s: float
) -> None:
    """A server that takes the publish but never acknowledges it (here: stopped, its
    connection still open): 503 once the shorter of NIPHAS_EVAL_PUBLISH_TIMEOUT_S and the
    bus's own ack timeout has passed, long before the client gives up."""
    if nats_server is None or nats_server.pid is None:
        pytest.skip("needs a nats-server this test owns")
    slow_bus = await Bus.connect(
        bus.settings.model_copy(update={"publish_timeout_s": bus_s}), name="t", provision=False
    )
    try:
        async with serve_ingress(slow_bus, publish_timeout_s=ours_s) as hooks:
            delivery = github_push("github-secret", clone_url=CLONE, after=B)
            os.kill(nats_server.pid, signal.SIGSTOP)
            try:
                async with hooks.http.post(
                    hooks.url + delivery.path,
                    data=delivery.body,
                    headers=delivery.headers,
                    timeout=aiohttp.ClientTimeout(total=10),
                ) as resp:
                    status, body = resp.status, await resp.json()
            finally:
                os.kill(nats_server.pid, signal.SIGCONT)
        assert (status, body["status"]) == (503, "unavailable"), body
        assert resp.headers["Retry-After"] == "5"
    finally:
        await slow_bus.close()


async def test_metrics_count_webhook_outcomes(ingress: Ingress) -> None:
    await ingress.send(github_push("wrong", clone_url=CLONE, after=B))
    async with ingress.http.get(ingress.url + "/metrics") as resp:
        text = await resp.text()
    line = next(
        line for line in text.splitlines()
        if line.startswith('niphas_eval_webhooks_total{forge="github",outcome="rejected"}')
    )  # fmt: skip
    assert float(line.split()[-1]) >= 1
    json.dumps(text[:10])
