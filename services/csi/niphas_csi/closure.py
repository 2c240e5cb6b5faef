"""What the node's store holds of a volume's closure, asked through the Nix layer."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from niphas_common.nix.errors import CommandError
from niphas_common.nix.runner import NixRunner


@dataclass(frozen=True, slots=True)
class Presence:
    closure: tuple[str, ...]
    """Every path of the closure of the present requested paths (sorted)."""
    missing: tuple[str, ...]
    """Requested paths that are not valid in the store (their closure is unknown yet)."""


class Closures:
    """Which paths of requested closures the node's store holds (one bounded `nix path-info`)."""

    def __init__(self, runner: NixRunner, concurrency: int) -> None:
        self.runner = runner
        # Bounded: each query is a nix process; a burst of pods must not fork hundreds.
        self._slots = asyncio.Semaphore(concurrency)

    async def presence(self, store_paths: Sequence[str]) -> Presence:
        async with self._slots:
            try:
                infos = await self.runner.apath_info(store_paths, recursive=True)
                return Presence(tuple(sorted(infos)), ())
            except CommandError:
                # `--recursive` fails outright on an invalid path; ask which are valid.
                valid = await self.runner.apath_info(store_paths)
                missing = tuple(p for p in store_paths if p not in valid)
                if not missing:
                    raise
                present = [p for p in store_paths if p in valid]
                infos = await self.runner.apath_info(present, recursive=True) if present else {}
                return Presence(tuple(sorted(infos)), missing)
