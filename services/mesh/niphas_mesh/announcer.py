"""This node's words about its paths (available, fetching, withdrawn, failed), given to the
`Router`, which records them in the holder state and publishes them on `path.available`."""

from __future__ import annotations

import logging

from niphas_common.nix.runner import PathInfo
from niphas_schemas import PathAvailable

from .router import Router

log = logging.getLogger(__name__)


class Announcer:
    def __init__(self, router: Router, node: str, url: str) -> None:
        self._router = router
        self.node = node
        self.url = url

    async def _publish(self, **fields: object) -> int:
        event = PathAvailable(
            holder_kind="node",
            holder=self.node,
            holder_url=self.url,
            **fields,
        )
        return await self._router.announce(event)

    async def available(self, info: PathInfo) -> int:
        return await self._publish(
            state="available",
            store_path=str(info.path),
            nar_hash=info.nar_hash.nix32,
            nar_size=info.nar_size,
            references=tuple(sorted(str(r) for r in info.references)),
        )

    async def fetching(self, path: str) -> int:
        return await self._publish(state="fetching", store_path=path)

    async def withdrawn(self, path: str) -> int:
        return await self._publish(state="withdrawn", store_path=path)

    async def failed(self, path: str, error: str) -> int:
        log.warning("could not get %s: %s", path, error)
        return await self._publish(state="failed", store_path=path, error=error[:4000])
