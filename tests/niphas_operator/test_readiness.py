"""The operator's readiness beyond the NATS connection: leader election must be running and
its last Lease request must have reached the API server (leader or standby alike). A fake
API stands in for the server, so the checks run without one."""

from __future__ import annotations

import asyncio
from typing import Any

from niphas_common.kube.client import Kube, KubeError
from niphas_operator.leader import LeaderElector
from tests.helpers import eventually


class FakeApi:
    """Just the Lease calls the elector makes; `down` makes every call fail like a
    connection refused."""

    def __init__(self) -> None:
        self.down = False
        self.lease: dict[str, Any] | None = None

    async def get(self, path: str) -> dict[str, Any] | None:
        self._check()
        return self.lease

    async def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self._check()
        self.lease = {**body, "metadata": {**body["metadata"], "resourceVersion": "1"}}
        return self.lease

    async def request(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        self._check()
        self.lease = body
        return body

    def _check(self) -> None:
        if self.down:
            raise KubeError(0, "connection refused")


def elector(api: FakeApi) -> LeaderElector:
    kube: Kube = api  # type: ignore[assignment]
    return LeaderElector(
        kube,
        namespace="niphas-system",
        name="niphas-operator",
        identity="me",
        lease_duration_s=1.0,
        renew_period_s=0.05,
    )


async def test_ready_only_while_electing_with_the_api_answering() -> None:
    api = FakeApi()
    candidate = elector(api)
    assert candidate.not_ready() == "leader election not running"
    stop = asyncio.Event()

    async def lead(lost: asyncio.Event) -> None:
        await lost.wait()

    campaign = asyncio.create_task(candidate.run(stop, lead))
    await eventually(lambda: candidate.leading, 5)
    assert candidate.not_ready() is None

    api.down = True
    await eventually(lambda: candidate.not_ready() is not None, 5)
    reason = candidate.not_ready()
    assert reason is not None and reason.startswith("API server unreachable")

    api.down = False
    await eventually(lambda: candidate.not_ready() is None, 5)
    stop.set()
    await asyncio.wait_for(campaign, 5)
    assert candidate.not_ready() == "leader election not running"
