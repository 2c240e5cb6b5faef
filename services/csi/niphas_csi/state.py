"""What the driver has published, persisted so a restart knows it: one JSON file per volume.

A record is written only once its mount is in place, and removed only after the mount is gone,
so on start every record names a volume kubelet believes is published.

Records outlive a restart of the driver (the page cache keeps them), not necessarily a power
loss: they are not fsynced, which cost a journal commit (~4 ms) on every publish. That is all a
record has to survive: a reboot takes every mount with it and kubelet publishes its pods'
volumes again, and a record a crash left empty or cut short reads as no record (its volume's
lease then goes as an orphan's, and kubelet's next publish takes it again).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class VolumeRecord:
    volume_id: str
    target: str
    store_paths: tuple[str, ...]
    """The requested paths (what the lease holds)."""
    view: str
    """Key of the closure's view (views.py)."""
    closure: tuple[str, ...]
    """Every path of the closure, as mounted."""
    pod: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> VolumeRecord:
        return cls(
            volume_id=str(data["volume_id"]),
            target=str(data["target"]),
            store_paths=tuple(data["store_paths"]),  # type: ignore[arg-type]
            view=str(data["view"]),
            closure=tuple(data["closure"]),  # type: ignore[arg-type]
            pod=dict(data.get("pod") or {}),  # type: ignore[call-overload]
        )


class VolumeState:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def _file(self, volume_id: str) -> Path:
        return self.directory / f"{volume_id}.json"

    def save(self, record: VolumeRecord) -> None:
        # Shallow: asdict() deep-copies each of a closure's thousands of strings (~1 ms).
        data = json.dumps(
            {**{f.name: getattr(record, f.name) for f in fields(record)}, "pod": dict(record.pod)},
            sort_keys=True,
        )
        final = self._file(record.volume_id)
        tmp = final.with_suffix(".json.tmp")
        with open(tmp, "w") as out:
            out.write(data)
        os.replace(tmp, final)

    def get(self, volume_id: str) -> VolumeRecord | None:
        try:
            return VolumeRecord.from_json(json.loads(self._file(volume_id).read_text()))
        except FileNotFoundError:
            return None

    def delete(self, volume_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._file(volume_id).unlink()

    def load(self) -> dict[str, VolumeRecord]:
        records = {}
        for path in sorted(self.directory.glob("*.json")):
            try:
                record = VolumeRecord.from_json(json.loads(path.read_text()))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("dropping the unreadable volume record %s (%s)", path, exc)
                path.unlink()
                continue
            records[record.volume_id] = record
        for stale in self.directory.glob("*.json.tmp"):
            stale.unlink()  # a save that crashed before its rename: never a published volume
        return records
