"""The demo's stack as the soak starts it: `Demo` on a NATS server list as well as one server."""

from __future__ import annotations

import logging

import nats

from niphas_demo.flow import Demo
from niphas_demo.layout import WORKLOAD
from niphas_demo.stack import Stack


class SoakDemo(Demo):
    async def start(self, env: dict[str, str], nats_url: str | None = None) -> None:
        """`Demo.start` on a server list too (`nats://a,nats://b`: the services split it, the
        nats client takes a list)."""
        assert nats_url is not None
        log = self.layout.demo / "niphas-up.log"
        self.stack = Stack(self.layout, self.ports, env, log, nats_url)
        self.stack.start()
        await self.stack.wait_ready()
        servers = [u.strip() for u in nats_url.split(",") if u.strip()]
        self.nc = await nats.connect(servers, name="niphas-chaos", error_cb=_reconnecting)
        self.niphas("rollback", WORKLOAD, "--unpin")


async def _reconnecting(exc: Exception) -> None:
    """The client reconnects on its own while a server restarts: no traceback per try."""
    logging.getLogger(__name__).debug("NATS: %r", exc)
