"""The cluster cache's directory: a Nix binary cache layout, written only whole and in order.

    nix-cache-info              fixed (served from memory, never written by a client)
    <hash>.narinfo              one per store path (32-character store hash)
    nar/<filehash>.nar[.zst]    the NAR files, named by the nix32 sha256 of their bytes

What an uploader may write, and the order that keeps every reader safe:

- only those two kinds of name (anything else, `..` included, is refused: `BadName`);
- a NAR file must hash to its name (checked while it streams in; a truncated or altered upload
  never gets the name), so `HEAD nar/<name>` answering 200 means those exact bytes are here:
  Nix skips uploading a NAR the cache already has, and that must be safe;
- a narinfo must name its own path, point at a NAR file that is already here with the size and
  hash it states, and list only references whose narinfos are here (Nix copies a closure in
  dependency order, NAR before narinfo), and with trusted keys configured it must carry a valid
  signature by one of them, or be a `.drv` or source whose NAR (decompressed and hashed here)
  proves its path, as Nix accepts them. Otherwise `Refused` and nothing is written;
- every file is written to a temp file (`.upload-*`, never matched by a served name), flushed to
  disk and renamed into place, so a reader sees a file whole or not at all. A crash leaves only
  temp files, removed at the next start (`remove_leftovers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from niphas_common.nix.content_proof import content_problem
from niphas_common.nix.errors import NixError
from niphas_common.nix.hashes import HashSink
from niphas_common.nix.narinfo import NarInfo
from niphas_common.nix.signing import TrustedKeys

from .cache_view import HASH_RE

log = logging.getLogger(__name__)

NIX32 = "0123456789abcdfghijklmnpqrsvwxyz"
NARINFO_RE = re.compile(rf"^({HASH_RE})\.narinfo$")
NAR_RE = re.compile(rf"^nar/([{NIX32}]{{52}})\.nar(\.zst)?$")
TEMP_PREFIX = ".upload-"
MAX_NARINFO_BYTES = 1 << 20
"""A narinfo of a path with thousands of references stays far below this."""


class BadName(Exception):
    """Not a name a binary cache upload may have."""


class Refused(Exception):
    """A well-named upload whose content is not acceptable (nothing was written)."""


class TooLarge(Refused):
    """An upload over the size limit."""


@dataclass(frozen=True)
class CacheFiles:
    """The directory and the rules for writing into it."""

    root: Path
    trusted: TrustedKeys = field(default_factory=TrustedKeys)
    max_nar_bytes: int = 16 << 30

    def __post_init__(self) -> None:
        (self.root / "nar").mkdir(parents=True, exist_ok=True)

    # -- reading -----------------------------------------------------------------------------

    def narinfo_file(self, hash_part: str) -> Path:
        return self.root / f"{hash_part}.narinfo"

    def nar_file(self, name: str) -> Path | None:
        """The file of `nar/<name>`, or None when `name` is not a NAR file name."""
        return self.root / "nar" / name if NAR_RE.match(f"nar/{name}") else None

    # -- writing -----------------------------------------------------------------------------

    async def put(self, name: str, chunks: AsyncIterator[bytes]) -> Path:
        """Store the upload named `name` (a path relative to the cache root); return its file."""
        if (nar := NAR_RE.match(name)) is not None:
            return await self._put_nar(name, nar.group(1), chunks)
        if (info := NARINFO_RE.match(name)) is not None:
            body = bytearray()
            async for chunk in chunks:
                body += chunk
                if len(body) > MAX_NARINFO_BYTES:
                    raise TooLarge(f"{name}: a narinfo over {MAX_NARINFO_BYTES} bytes")
            # In a thread: the write is fsynced, and an unsigned one's NAR is read through.
            return await asyncio.to_thread(self._put_narinfo, info.group(1), bytes(body))
        raise BadName(f"{name!r}: only <hash>.narinfo and nar/<filehash>.nar[.zst] can be uploaded")

    async def _put_nar(self, name: str, file_hash: str, chunks: AsyncIterator[bytes]) -> Path:
        target = self.root / name
        sink = HashSink("sha256")
        with _temp_beside(target) as (tmp, f):
            async for chunk in chunks:
                sink.update(chunk)
                if sink.size > self.max_nar_bytes:
                    raise TooLarge(f"{name}: over the limit of {self.max_nar_bytes} bytes")
                f.write(chunk)
            got = sink.hash().nix32.partition(":")[2]
            if got != file_hash:
                raise Refused(f"{name}: the bytes hash to {got}, not to the file's name")
            await asyncio.to_thread(_commit, tmp, f, target)
        log.info("cache: stored %s (%d bytes)", name, sink.size)
        return target

    def _put_narinfo(self, hash_part: str, body: bytes) -> Path:
        try:
            info = NarInfo.parse(body.decode())
        except (NixError, UnicodeDecodeError) as exc:
            raise Refused(f"{hash_part}.narinfo: not a narinfo: {exc}") from exc
        self.check_narinfo(hash_part, info)
        target = self.narinfo_file(hash_part)
        with _temp_beside(target) as (tmp, f):
            f.write(body)
            _commit(tmp, f, target)
        log.info("cache: stored %s.narinfo (%s)", hash_part, info.store_path)
        return target

    def check_narinfo(self, hash_part: str, info: NarInfo) -> None:
        """Raise Refused unless `info` may be published as `<hash_part>.narinfo` now."""
        what = f"{hash_part}.narinfo"
        if info.hash_part != hash_part:
            raise Refused(f"{what}: it describes {info.store_path}, another path")
        nar = NAR_RE.match(info.url)
        if nar is None:
            raise Refused(f"{what}: URL {info.url!r} is not nar/<filehash>.nar[.zst]")
        if (nar.group(2) is not None) != (info.compression == "zstd") or info.compression not in (
            "zstd",
            "none",
        ):
            raise Refused(f"{what}: compression {info.compression} does not match {info.url}")
        file = self.root / info.url
        if not file.is_file():
            raise Refused(f"{what}: {info.url} is not uploaded yet (the NAR goes first)")
        if info.file_hash is not None and info.file_hash.nix32.partition(":")[2] != nar.group(1):
            raise Refused(f"{what}: FileHash does not match {info.url}")
        if info.file_size is not None and info.file_size != file.stat().st_size:
            raise Refused(f"{what}: FileSize {info.file_size} but {info.url} is not that size")
        missing = [
            str(r) for r in info.reference_paths() if not self.narinfo_file(r.hash_part).is_file()
        ]
        if missing:
            raise Refused(f"{what}: references not in the cache yet: {', '.join(missing)}")
        if self.trusted:
            try:
                info.check_signature(self.trusted)
            except NixError as exc:
                # As in Nix: a .drv or source proves itself by its bytes (what eval workers
                # upload for build pods); anything else needs a trusted signature.
                if (problem := content_problem(info, file)) is not None:
                    raise Refused(f"{what}: {exc}; and {problem}") from exc

    def remove_leftovers(self) -> list[Path]:
        """Delete the temp files of uploads a crash interrupted (call before serving)."""
        removed = []
        for directory in (self.root, self.root / "nar"):
            for tmp in directory.glob(f"{TEMP_PREFIX}*"):
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                    removed.append(tmp)
                    log.info("cache: removed %s, left by an interrupted upload", tmp)
        return removed


@contextlib.contextmanager
def _temp_beside(target: Path) -> Iterator[tuple[Path, BinaryIO]]:
    """A temp file in `target`'s directory (same file system: the rename is atomic); removed
    unless committed."""
    fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=target.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            yield tmp, f
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _commit(tmp: Path, f: BinaryIO, target: Path) -> None:
    f.flush()
    os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, target)
