"""Streaming NAR parsing and safe unpacking.

`NarParser` is push-based (sans I/O): feed it chunks as they arrive from a file, a pipe, a
decompressor or an HTTP response, sync or async alike, and it drives a `NarSink`. Memory stays
bounded: file contents pass straight through, and every other string has a small length cap.

The parser rejects everything Nix's writer would never produce and that could make an unpacker
misbehave: names that are empty, `.`, `..`, or contain `/` or NUL; entries out of order or
repeated (which is also how "a symlink, then a file through it" is stopped: the second entry
would need the same name, or a name with a `/`); non-zero padding; unknown tokens; trailing
bytes; streams that end early. Unpacking to disk is `nar_restore`'s.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterable
from dataclasses import dataclass
from typing import BinaryIO, Final, Protocol

from .errors import NarError
from .nar import CHUNK_SIZE, NAR_MAGIC

NarPath = tuple[bytes, ...]
"""Where an entry lives inside the NAR: the names from the root down (empty for the root)."""

_TOKEN_MAX: Final = 64


@dataclass(frozen=True, slots=True)
class NarLimits:
    """Bounds a parser enforces, so that a hostile stream cannot exhaust memory or disk."""

    max_depth: int = 256
    """Directory nesting; deeper trees are rejected (store paths are never this deep)."""
    max_name_len: int = 255
    """Bytes in one entry name (Linux NAME_MAX)."""
    max_target_len: int = 4095
    """Bytes in a symlink target (Linux PATH_MAX minus the NUL)."""
    max_nar_size: int | None = None
    """Total bytes of NAR; callers that know the NarSize pass it here."""
    max_entries: int | None = None
    """Total files, directories and symlinks."""


class NarSink(Protocol):
    """What a parser drives. Calls arrive in NAR order; a file's writes come between
    `begin_file` and `end_file`; `end_directory` closes the innermost open directory."""

    def directory(self, path: NarPath) -> None: ...
    def end_directory(self) -> None: ...
    def begin_file(self, path: NarPath, executable: bool, size: int) -> None: ...
    def write(self, data: memoryview) -> None: ...
    def end_file(self) -> None: ...
    def symlink(self, path: NarPath, target: bytes) -> None: ...


class NullSink:
    """Accepts everything: parse only to validate (and count entries)."""

    def __init__(self) -> None:
        self.entries = 0

    def directory(self, path: NarPath) -> None:
        self.entries += 1

    def end_directory(self) -> None:
        pass

    def begin_file(self, path: NarPath, executable: bool, size: int) -> None:
        self.entries += 1

    def write(self, data: memoryview) -> None:
        pass

    def end_file(self) -> None:
        pass

    def symlink(self, path: NarPath, target: bytes) -> None:
        self.entries += 1


# What the parsing generator yields: n > 0 asks for exactly n bytes, n < 0 for 1..-n bytes.
_Parse = Generator[int, memoryview, None]
_ParseStr = Generator[int, memoryview, bytes]


class NarParser:
    """Push parser: `feed()` chunks, then `finish()`; raises NarError on the first problem."""

    def __init__(self, sink: NarSink, limits: NarLimits | None = None) -> None:
        self.sink = sink
        self.limits = limits or NarLimits()
        self.size = 0
        """Bytes consumed so far."""
        self._entries = 0
        self._buf = bytearray()
        self._done = False
        self._failed: NarError | None = None
        self._gen = self._archive()
        self._want = next(self._gen)

    @property
    def done(self) -> bool:
        return self._done

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._failed is not None:
            raise self._failed
        try:
            self._feed(memoryview(data).cast("B"))
        except NarError as exc:
            self._fail(exc)
        except (OSError, ValueError, UnicodeError) as exc:
            # The sink's own failures (disk full, EEXIST, ...) end the parse the same way.
            self._fail(NarError(f"cannot unpack NAR at byte {self.size}: {exc}"))

    def finish(self) -> None:
        """Declare the end of input: a NAR that is not complete is truncated."""
        if self._failed is not None:
            raise self._failed
        if not self._done:
            self._fail(NarError(f"NAR truncated after {self.size} bytes"))

    def _fail(self, exc: NarError) -> None:
        self._failed = exc
        self._gen.close()
        raise exc

    def _feed(self, mv: memoryview) -> None:
        total = len(mv)
        max_size = self.limits.max_nar_size
        if max_size is not None and self.size + total > max_size:
            raise NarError(f"NAR is larger than the limit of {max_size} bytes")
        pos = 0
        while True:
            if self._done:
                if pos < total:
                    raise NarError(f"trailing data after the end of the NAR (byte {self.size})")
                return
            want = self._want
            if want > 0:
                if self._buf or total - pos < want:
                    take = mv[pos : pos + want - len(self._buf)]
                    self._buf += take
                    pos += len(take)
                    if len(self._buf) < want:
                        return
                    chunk = memoryview(bytes(self._buf))
                    self._buf.clear()
                else:
                    chunk = mv[pos : pos + want]
                    pos += want
            else:
                if pos == total:
                    return
                chunk = mv[pos : pos - want]
                pos += len(chunk)
            self.size += len(chunk)
            try:
                self._want = self._gen.send(chunk)
            except StopIteration:
                self._done = True

    # -- the grammar, as a recursive-descent generator ------------------------------------

    def _str(self, max_len: int, what: str) -> _ParseStr:
        n = int.from_bytes((yield 8), "little")
        if n > max_len:
            raise NarError(f"{what} of {n} bytes is over the limit of {max_len} (byte {self.size})")
        padded = n + (-n % 8)
        if not padded:
            return b""
        data = bytes((yield padded))
        if any(data[n:]):
            raise NarError(f"non-zero padding after a {what} (byte {self.size})")
        return data[:n]

    def _expect(self, token: bytes) -> _Parse:
        got = yield from self._str(_TOKEN_MAX, "token")
        if got != token:
            raise NarError(f"expected {token!r}, got {got[:32]!r} (byte {self.size})")

    def _archive(self) -> _Parse:
        magic = yield from self._str(_TOKEN_MAX, "magic")
        if magic != NAR_MAGIC:
            raise NarError("not a NAR: bad magic")
        yield from self._node((), 0)

    def _count(self) -> None:
        self._entries += 1
        limit = self.limits.max_entries
        if limit is not None and self._entries > limit:
            raise NarError(f"NAR has more than {limit} entries")

    def _node(self, path: NarPath, depth: int) -> _Parse:
        yield from self._expect(b"(")
        yield from self._expect(b"type")
        kind = yield from self._str(_TOKEN_MAX, "type")
        self._count()
        if kind == b"regular":
            yield from self._regular(path)
        elif kind == b"symlink":
            yield from self._expect(b"target")
            target = yield from self._str(self.limits.max_target_len, "symlink target")
            if not target or b"\0" in target:
                raise NarError(f"invalid symlink target {target!r} at {_show(path)}")
            self.sink.symlink(path, target)
        elif kind == b"directory":
            if depth > self.limits.max_depth:
                raise NarError(f"directories nested deeper than {self.limits.max_depth}")
            yield from self._directory(path, depth)
            return  # the directory consumed its own ")"
        else:
            raise NarError(f"unknown entry type {kind[:32]!r} at {_show(path)}")
        yield from self._expect(b")")

    def _regular(self, path: NarPath) -> _Parse:
        token = yield from self._str(_TOKEN_MAX, "token")
        executable = token == b"executable"
        if executable:
            if (yield from self._str(_TOKEN_MAX, "token")) != b"":
                raise NarError(f"executable marker must be empty at {_show(path)}")
            token = yield from self._str(_TOKEN_MAX, "token")
        if token != b"contents":
            raise NarError(f"expected 'contents', got {token[:32]!r} at {_show(path)}")
        size = int.from_bytes((yield 8), "little")
        max_size = self.limits.max_nar_size
        if max_size is not None and size > max_size:
            raise NarError(f"file of {size} bytes at {_show(path)} is over the NAR size limit")
        self.sink.begin_file(path, executable, size)
        remaining = size
        while remaining:
            chunk = yield -min(remaining, CHUNK_SIZE)
            self.sink.write(chunk)
            remaining -= len(chunk)
        if size % 8 and any((yield 8 - size % 8)):
            raise NarError(f"non-zero padding after the contents of {_show(path)}")
        self.sink.end_file()

    def _directory(self, path: NarPath, depth: int) -> _Parse:
        self.sink.directory(path)
        previous: bytes | None = None
        while True:
            token = yield from self._str(_TOKEN_MAX, "token")
            if token == b")":
                break
            if token != b"entry":
                raise NarError(f"expected 'entry' or ')', got {token[:32]!r} in {_show(path)}")
            yield from self._expect(b"(")
            yield from self._expect(b"name")
            name = yield from self._str(self.limits.max_name_len, "entry name")
            check_name(name, path)
            if previous is not None and name <= previous:
                problem = "duplicate" if name == previous else "unsorted"
                raise NarError(f"{problem} entry {name!r} in {_show(path)}")
            previous = name
            yield from self._expect(b"node")
            yield from self._node((*path, name), depth + 1)
            yield from self._expect(b")")
        self.sink.end_directory()


def check_name(name: bytes, parent: NarPath = ()) -> None:
    """Reject entry names that could escape or alias within the unpacked tree."""
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise NarError(f"invalid entry name {name!r} in {_show(parent)}")


def _show(path: NarPath) -> str:
    return "/" + "/".join(os.fsdecode(p) for p in path)


def parse(source: bytes | BinaryIO | Iterable[bytes], limits: NarLimits | None = None) -> int:
    """Validate a NAR without writing anything; return its size."""
    parser = NarParser(NullSink(), limits)
    for chunk in chunks(source):
        parser.feed(chunk)
    parser.finish()
    return parser.size


def chunks(source: bytes | BinaryIO | Iterable[bytes]) -> Iterable[bytes]:
    """A NAR given as bytes, a binary file or an iterable of chunks, as chunks."""
    if isinstance(source, bytes):
        return (source,)
    read = getattr(source, "read", None)
    if read is None:
        return source
    return iter(lambda: read(CHUNK_SIZE), b"")
