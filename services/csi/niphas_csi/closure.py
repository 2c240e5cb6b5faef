"""What the node's store holds of a volume's closure, read from the store's own Nix database:
which requested paths are valid and the closure of those, in one SQL snapshot and no `nix`
process (starting `nix path-info --recursive` cost ~30 ms, most of a publish).

Nix records every valid path in `ValidPaths` and the references between them in `Refs` (the
schema of every Nix since the SQLite store); a path is valid exactly when its row exists, which
is what `nix path-info` itself asks. The file is opened read-only, so nothing here can write the
store's metadata, and Nix keeps it in WAL mode, where a reader sees the last committed state
without blocking the writer (the mesh's imports, nix-daemon). A store that has no database yet
(nothing was ever added to it) holds no valid path.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from .errors import VolumeError

DB_FILE = "nix/var/nix/db/db.sqlite"
"""The database, relative to the store root (`/` for the host store)."""

_CLOSURE_SQL = """
WITH RECURSIVE closure(id) AS (
    SELECT id FROM ValidPaths WHERE path IN ({params})
    UNION
    SELECT Refs.reference FROM Refs JOIN closure ON Refs.referrer = closure.id
)
SELECT path FROM ValidPaths WHERE id IN (SELECT id FROM closure)
"""


class StoreDbError(VolumeError):
    """The store's database could not be read (locked past the timeout, damaged...)."""


@dataclass(frozen=True, slots=True)
class Presence:
    closure: tuple[str, ...]
    """Every path of the closure of the valid requested paths (sorted)."""
    missing: tuple[str, ...]
    """Requested paths that are not valid in the store (their closure is unknown yet)."""


class StoreDb:
    """The database of the store at `store_root` (None: the host store), opened per query."""

    def __init__(self, store_root: str | os.PathLike[str] | None, busy_timeout_s: float) -> None:
        self.path = Path(os.fspath(store_root or "/")) / DB_FILE
        self.busy_timeout_s = busy_timeout_s
        self._uri = f"file:{quote(str(self.path))}?mode=ro"

    def presence(self, store_paths: Sequence[str]) -> Presence:
        """Which requested paths are valid, and the closure of those that are (one snapshot)."""
        if not store_paths:
            return Presence((), ())
        try:
            db = sqlite3.connect(
                self._uri, uri=True, timeout=self.busy_timeout_s, isolation_level=None
            )
        except sqlite3.OperationalError:
            if not self.path.exists():  # nothing was ever added to this store
                return Presence((), tuple(store_paths))
            raise StoreDbError(f"cannot open the store database {self.path}") from None
        try:
            db.execute("BEGIN")  # one read snapshot for both queries
            params = ",".join("?" * len(store_paths))
            valid = {
                row[0]
                for row in db.execute(
                    f"SELECT path FROM ValidPaths WHERE path IN ({params})",
                    tuple(store_paths),
                )
            }
            missing = tuple(p for p in store_paths if p not in valid)
            closure: list[str] = []
            if valid:
                present = tuple(p for p in store_paths if p in valid)
                sql = _CLOSURE_SQL.format(params=",".join("?" * len(present)))
                closure = [row[0] for row in db.execute(sql, present)]
            return Presence(tuple(sorted(closure)), missing)
        except sqlite3.Error as exc:
            raise StoreDbError(f"cannot read the store database {self.path}: {exc}") from exc
        finally:
            db.close()


class Closures:
    """Presence queries off the event loop (SQLite releases the GIL while it reads), bounded so
    a burst of pods does not queue hundreds of threads."""

    def __init__(self, db: StoreDb, concurrency: int) -> None:
        self.db = db
        self._slots = asyncio.Semaphore(concurrency)

    async def presence(self, store_paths: Sequence[str]) -> Presence:
        async with self._slots:
            return await asyncio.to_thread(self.db.presence, store_paths)
