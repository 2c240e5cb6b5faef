"""NAR (Nix ARchive) serialisation: a file system tree -> the exact bytes `nix-store --dump` writes.

The format is a sequence of strings, each a little-endian u64 length, the bytes, and zero
padding to a multiple of 8:

    "nix-archive-1" node
    node      = "(" "type" ( "regular" ["executable" ""] "contents" <bytes>
                           | "symlink" "target" <target>
                           | "directory" { "entry" "(" "name" <name> "node" node ")" } ) ")"

Directory entries appear sorted bytewise by name (Nix keeps them in a std::map). A file counts as
executable when its owner-execute bit is set; every other metadata (times, owners, other mode
bits) is left out, which is what makes NAR hashes reproducible.

Serialising streams: memory stays bounded by one chunk however large the files are.
"""

from __future__ import annotations

import io
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Final

from .errors import NarError
from .hashes import Hash, HashSink

NAR_MAGIC: Final = b"nix-archive-1"
CHUNK_SIZE: Final = 1 << 20
"""Read/write granularity: large enough that per-call overhead vanishes next to hashing."""
INLINE_FILE_LIMIT: Final = 64 << 10
"""Files up to this size are copied into the framing buffer instead of streamed on their own."""


def nar_string(data: bytes) -> bytes:
    """Encode one NAR string: u64 length, bytes, zero padding to 8."""
    n = len(data)
    return struct.pack("<Q", n) + data + b"\0" * (-n % 8)


def padding(size: int) -> bytes:
    """The zero bytes that follow `size` bytes of file contents."""
    return b"\0" * (-size % 8)


_MAGIC = nar_string(NAR_MAGIC)
_OPEN = nar_string(b"(")
_CLOSE = nar_string(b")")
_TYPE_REGULAR = nar_string(b"type") + nar_string(b"regular")
_EXECUTABLE = nar_string(b"executable") + nar_string(b"")
_CONTENTS = nar_string(b"contents")
_TYPE_SYMLINK = nar_string(b"type") + nar_string(b"symlink") + nar_string(b"target")
_TYPE_DIRECTORY = nar_string(b"type") + nar_string(b"directory")
_ENTRY_NAME = nar_string(b"entry") + _OPEN + nar_string(b"name")
_NODE = nar_string(b"node")


@dataclass(frozen=True, slots=True)
class _Contents:
    """A placeholder in the token stream: the contents of one regular file go here."""

    path: bytes
    size: int


def _walk(path: bytes, st: os.stat_result) -> Iterator[bytes | _Contents]:
    """Yield the NAR of `path` as framing bytes and file-content placeholders."""
    mode = st.st_mode
    if stat.S_ISREG(mode):
        head = _OPEN + _TYPE_REGULAR
        if mode & stat.S_IXUSR:
            head += _EXECUTABLE
        yield head + _CONTENTS + struct.pack("<Q", st.st_size)
        yield _Contents(path, st.st_size)
        yield padding(st.st_size) + _CLOSE
    elif stat.S_ISLNK(mode):
        yield _OPEN + _TYPE_SYMLINK + nar_string(os.readlink(path)) + _CLOSE
    elif stat.S_ISDIR(mode):
        yield _OPEN + _TYPE_DIRECTORY
        # bytes names sort bytewise, exactly like Nix's std::map<std::string, ...>
        for name in sorted(os.listdir(path)):
            child = path + b"/" + name
            yield _ENTRY_NAME + nar_string(name) + _NODE
            yield from _walk(child, os.lstat(child))
            yield _CLOSE
        yield _CLOSE
    else:
        raise NarError(f"cannot put {os.fsdecode(path)!r} in a NAR: not a file, dir or symlink")


def _tokens(path: str | os.PathLike[str]) -> Iterator[bytes | _Contents]:
    root = os.fsencode(path)
    yield _MAGIC
    try:
        st = os.lstat(root)
    except OSError as exc:
        raise NarError(f"cannot serialise {os.fsdecode(root)!r}: {exc}") from exc
    yield from _walk(root, st)


def _read_exact(fd: int, size: int, path: bytes, chunk_size: int) -> Iterator[bytes]:
    remaining = size
    while remaining:
        data = os.read(fd, min(remaining, chunk_size))
        if not data:
            # The header already promised `size` bytes; a shrinking file would corrupt the NAR.
            raise NarError(f"{os.fsdecode(path)!r} shrank while being serialised")
        remaining -= len(data)
        yield data


def iter_nar(path: str | os.PathLike[str], chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Yield the NAR serialisation of `path` in chunks of roughly `chunk_size` bytes."""
    buf = bytearray()
    try:
        for token in _tokens(path):
            if isinstance(token, bytes):
                buf += token
                if len(buf) >= chunk_size:
                    yield bytes(buf)
                    buf.clear()
                continue
            if token.size <= INLINE_FILE_LIMIT:
                buf += _read_small(token)
                if len(buf) >= chunk_size:
                    yield bytes(buf)
                    buf.clear()
                continue
            if buf:
                yield bytes(buf)
                buf.clear()
            fd = _open(token)
            try:
                yield from _read_exact(fd, token.size, token.path, chunk_size)
            finally:
                os.close(fd)
    except OSError as exc:
        raise NarError(f"cannot serialise {os.fspath(path)!r}: {exc}") from exc
    if buf:
        yield bytes(buf)


def write_nar(path: str | os.PathLike[str], out: BinaryIO | int) -> int:
    """Write the NAR of `path` to a binary file or file descriptor; return its size.

    With a real file descriptor, file contents go through os.sendfile (no copy into Python),
    which is what lets the serialiser keep up with `nix-store --dump`.
    """
    fd = _fileno(out)
    if fd is None:
        assert not isinstance(out, int)
        size = 0
        for chunk in iter_nar(path):
            out.write(chunk)
            size += len(chunk)
        return size
    if not isinstance(out, int):
        out.flush()
    size = 0
    buf = bytearray()
    try:
        for token in _tokens(path):
            if isinstance(token, bytes):
                buf += token
                continue
            if token.size <= INLINE_FILE_LIMIT:
                buf += _read_small(token)
                continue
            size += _write_all(fd, buf)
            buf.clear()
            size += _sendfile(fd, token)
        size += _write_all(fd, buf)
    except OSError as exc:
        raise NarError(f"cannot serialise {os.fspath(path)!r}: {exc}") from exc
    return size


def nar_hash(path: str | os.PathLike[str]) -> tuple[Hash, int]:
    """The sha256 NAR hash and NAR size of `path` (what `nix path-info` calls narHash/narSize)."""
    sink = HashSink()
    for chunk in iter_nar(path):
        sink.update(chunk)
    return sink.hash(), sink.size


def nar_bytes(path: str | os.PathLike[str]) -> bytes:
    """The whole NAR of `path` in memory: for small trees and tests only."""
    return b"".join(iter_nar(path))


def _fileno(out: BinaryIO | int) -> int | None:
    if isinstance(out, int):
        return out
    try:
        return out.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None


def _write_all(fd: int, data: bytes | bytearray) -> int:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    return len(data)


def _open(token: _Contents) -> int:
    return os.open(token.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)


def _read_small(token: _Contents) -> bytes:
    fd = _open(token)
    try:
        return b"".join(_read_exact(fd, token.size, token.path, INLINE_FILE_LIMIT))
    finally:
        os.close(fd)


def _sendfile(out_fd: int, token: _Contents) -> int:
    in_fd = _open(token)
    try:
        offset = 0
        while offset < token.size:
            try:
                sent = os.sendfile(out_fd, in_fd, offset, token.size - offset)
            except OSError:
                if offset:
                    raise
                # Some outputs (e.g. certain pipes or sockets) refuse sendfile: copy instead.
                for data in _read_exact(in_fd, token.size, token.path, CHUNK_SIZE):
                    _write_all(out_fd, data)
                offset = token.size
                break
            if sent == 0:
                raise NarError(f"{os.fsdecode(token.path)!r} shrank while being serialised")
            offset += sent
    finally:
        os.close(in_fd)
    return token.size
