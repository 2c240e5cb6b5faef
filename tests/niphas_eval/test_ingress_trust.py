"""The authenticated entry decides the repository (real ingress on loopback, real nats-server):
a valid secret for one repository cannot publish a push for another (one without an entry,
one of another forge, a `file://` URL); an entry's `clone_url` is what is evaluated whatever
the payload says; and a delivery is what it means: the same signed body replayed under a new
delivery id, or sent with another forge's header set, is stored once."""

from __future__ import annotations

import json

from niphas_common.bus.bus import Bus
from tests.niphas_eval.conftest import (
    Delivery,
    Ingress,
    gitea_push,
    github_push,
    gitlab_push,
    pushes,
)
from tests.niphas_eval.test_ingress import resigned, stored

A = "a" * 40
B = "b" * 40
CLONE = "https://github.example/acme/app.git"


async def test_a_secret_cannot_publish_for_another_repository(ingress: Ingress, bus: Bus) -> None:
    app_secret = "github-secret"  # acme/app's
    cases = {
        "a repository without an entry": github_push(
            app_secret, clone_url="https://github.example/evil/x.git", full_name="evil/x", after=B
        ),
        "a repository of another forge": github_push(
            app_secret, clone_url="https://gitea.example/acme/site.git", full_name="acme/site",
            after=B,
        ),
        "another github repository with its own secret": github_push(
            app_secret, clone_url="https://github.example/acme/pinned.git",
            full_name="acme/pinned", after=B,
        ),
        "its own name with a file:// clone URL": github_push(
            app_secret, clone_url="file:///etc/secret-repo", full_name="acme/app", after=B
        ),
        "its own name with another repository's URL": github_push(
            app_secret, clone_url="https://github.example/evil/x.git", full_name="acme/app",
            after=B,
        ),
        "gitlab: acme/api's token for another project": gitlab_push(
            "gitlab-token", clone_url="https://gitlab.example/acme/other.git",
            path_with_namespace="acme/other", after=B,
        ),
        "gitea: acme/site's secret naming acme/forgejo-site": gitea_push(
            "gitea-secret", clone_url="https://gitea.example/acme/forgejo-site.git",
            full_name="acme/forgejo-site", after=B,
        ),
    }  # fmt: skip
    for name, delivery in cases.items():
        status, body = await ingress.send(delivery)
        assert status in (401, 403), f"{name}: {status} {body}"
        assert body["status"] == "rejected", name
    assert await stored(bus) == 0

    # The same secret for its own repository is accepted, with the URL the payload gave.
    status, body = await ingress.send(github_push(app_secret, clone_url=CLONE, after=B))
    assert status == 202, body
    [push] = await pushes(bus)
    assert push.repository == CLONE


async def test_the_entrys_clone_url_is_evaluated_whatever_the_payload_says(
    ingress: Ingress, bus: Bus
) -> None:
    # The entry keyed by its URL pins clone_url; the payload's clone_url is not used.
    delivery = github_push(
        "pinned-secret", clone_url="https://github.example/acme/pinned.git",
        full_name="acme/pinned", after=B,
    )  # fmt: skip
    payload = json.loads(delivery.body)
    payload["repository"]["full_name"] = "evil/elsewhere"
    payload["repository"]["ssh_url"] = "file:///etc"
    status, body = await ingress.send(resigned(delivery, json.dumps(payload).encode(),
                                               "pinned-secret"))  # fmt: skip
    assert status == 202, body
    [push] = await pushes(bus)
    assert push.repository == "https://git.internal.example/acme/pinned.git"
    assert push.forge == "github"


async def test_a_replayed_signed_body_is_never_a_new_push(ingress: Ingress, bus: Bus) -> None:
    first = github_push("github-secret", clone_url=CLONE, before=A, after=B)
    status, body = await ingress.send(first)
    assert (status, body["duplicate"]) == (202, False)

    # The same body, captured and sent again under fresh delivery ids.
    for n in range(3):
        headers = {**first.headers, "X-GitHub-Delivery": f"replayed-{n}"}
        status, body = await ingress.send(Delivery(first.path, headers, first.body))
        assert (status, body["duplicate"]) == (202, True), body
    assert await stored(bus) == 1

    # A new push of the same ref (another before/after) is a new push.
    status, body = await ingress.send(
        github_push("github-secret", clone_url=CLONE, before=B, after=A)
    )
    assert (status, body["duplicate"]) == (202, False)
    assert await stored(bus) == 2


async def test_the_same_delivery_with_another_forges_headers_is_stored_once(
    ingress: Ingress, bus: Bus
) -> None:
    site = "https://gitea.example/acme/site.git"
    gitea = gitea_push("gitea-secret", clone_url=site, after=B, delivery="d-1")
    as_forgejo = gitea_push("gitea-secret", clone_url=site, after=B, forgejo=True, delivery="d-2")
    assert gitea.body == as_forgejo.body

    answers = [await ingress.send(d) for d in (gitea, as_forgejo)]
    assert [(s, b["duplicate"]) for s, b in answers] == [(202, False), (202, True)]
    [push] = await pushes(bus)
    assert push.forge == "gitea"  # the entry's forge, not the headers'
