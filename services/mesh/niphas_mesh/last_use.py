"""When each store path was last used on this node: what LRU garbage collection orders by.

Nix canonicalises store file times (mtime 1) and nodes often mount with noatime, so the agent
keeps its own record: a path is used when it is fetched, wanted or served. The record is saved
to the node's state dir so a restart does not make everything look equally old.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path


class LastUse:
    def __init__(self, file: Path) -> None:
        self.file = file
        self._times: dict[str, float] = {}
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(file.read_text())
            if isinstance(data, dict):
                self._times = {str(k): float(v) for k, v in data.items()}

    def touch(self, hash_part: str, when: float | None = None) -> None:
        self._times[hash_part] = time.time() if when is None else when

    def get(self, hash_part: str) -> float:
        """Seconds since the epoch; 0 for a path never seen used (collected first)."""
        return self._times.get(hash_part, 0.0)

    def forget(self, hash_part: str) -> None:
        self._times.pop(hash_part, None)

    def save(self) -> None:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._times))
        os.replace(tmp, self.file)
