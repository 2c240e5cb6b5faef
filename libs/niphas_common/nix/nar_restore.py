"""Safe unpacking of a NAR into a directory, driven by the streaming `NarParser`.

`DirectorySink` creates everything relative to directory file descriptors it opened itself
with O_NOFOLLOW, so even a parser bug could not write through a symlink; `NarRestorer` takes
chunks as they arrive and removes the partial tree on any error; `restore` unpacks a whole NAR.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from .errors import NarError
from .nar_parser import NarLimits, NarParser, NarPath, chunks


class DirectorySink:
    """Unpacks into `dest`, which must not exist yet. Files get mode 0644 (0755 when
    executable), directories 0755; `remove()` deletes whatever was created."""

    def __init__(self, dest: str | os.PathLike[str]) -> None:
        self.dest = Path(dest)
        self._parent_fd = os.open(self.dest.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._dirs: list[int] = []
        self._file: int | None = None
        self._created = False

    def _at(self, path: NarPath) -> tuple[int, bytes]:
        if not path:
            return self._parent_fd, os.fsencode(self.dest.name)
        # The parser's nesting guarantees the innermost open dir is this entry's parent.
        return self._dirs[-1], path[-1]

    def directory(self, path: NarPath) -> None:
        parent, name = self._at(path)
        os.mkdir(name, 0o700, dir_fd=parent)
        self._created = True
        fd = os.open(
            name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent
        )
        os.fchmod(fd, 0o755)
        self._dirs.append(fd)

    def end_directory(self) -> None:
        os.close(self._dirs.pop())

    def begin_file(self, path: NarPath, executable: bool, size: int) -> None:
        parent, name = self._at(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        self._file = os.open(name, flags, 0o600, dir_fd=parent)
        self._created = True
        os.fchmod(self._file, 0o755 if executable else 0o644)

    def write(self, data: memoryview) -> None:
        assert self._file is not None
        while data:
            data = data[os.write(self._file, data) :]

    def end_file(self) -> None:
        assert self._file is not None
        os.close(self._file)
        self._file = None

    def symlink(self, path: NarPath, target: bytes) -> None:
        parent, name = self._at(path)
        os.symlink(target, name, dir_fd=parent)
        self._created = True

    def close(self) -> None:
        """Release file descriptors (idempotent)."""
        if self._file is not None:
            os.close(self._file)
            self._file = None
        while self._dirs:
            os.close(self._dirs.pop())
        if self._parent_fd >= 0:
            os.close(self._parent_fd)
            self._parent_fd = -1

    def remove(self) -> None:
        """Delete the partial output (never follows symlinks inside it)."""
        self.close()
        if not self._created:
            return
        if self.dest.is_dir() and not self.dest.is_symlink():
            shutil.rmtree(self.dest)
        else:
            self.dest.unlink(missing_ok=True)


class NarRestorer:
    """Unpack a NAR pushed in chunks into `dest`; on any error the partial tree is removed."""

    def __init__(self, dest: str | os.PathLike[str], limits: NarLimits | None = None) -> None:
        try:
            self._sink = DirectorySink(dest)
        except OSError as exc:
            raise NarError(f"cannot unpack into {os.fspath(dest)!r}: {exc}") from exc
        self._parser = NarParser(self._sink, limits)

    @property
    def size(self) -> int:
        return self._parser.size

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        try:
            self._parser.feed(data)
        except NarError:
            self.abort()
            raise

    def finish(self) -> None:
        try:
            self._parser.finish()
        except NarError:
            self.abort()
            raise
        self._sink.close()

    def abort(self) -> None:
        """Give up and delete the partial output (e.g. when a download fails midway)."""
        self._sink.remove()


def restore(
    source: bytes | BinaryIO | Iterable[bytes],
    dest: str | os.PathLike[str],
    limits: NarLimits | None = None,
) -> int:
    """Unpack a NAR from a binary file or an iterable of chunks into `dest`; return its size."""
    restorer = NarRestorer(dest, limits)
    try:
        for chunk in chunks(source):
            restorer.feed(chunk)
    except NarError:
        raise
    except BaseException:
        restorer.abort()
        raise
    restorer.finish()
    return restorer.size
