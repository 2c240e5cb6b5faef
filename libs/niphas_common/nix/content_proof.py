"""Checking a path against its own bytes: what a binary cache may accept without a signature.

A narinfo's NAR proves nothing until it is decompressed and hashed; then a `.drv` (a text
path) and a source (a recursive sha256 path) prove their own store path, since anyone can
recompute it from the bytes and the references (`content_address`). Nix itself accepts such
paths from a substituter without a signature. Build outputs prove nothing this way.
"""

from __future__ import annotations

from pathlib import Path

from .compression import decompressor
from .content_address import source_path, text_path
from .errors import NixError
from .hashes import NarVerifier
from .nar_parser import NarParser, NarPath, NullSink
from .narinfo import NarInfo

READ_CHUNK = 1 << 20
MAX_DRV_BYTES = 16 << 20
"""A `.drv` larger than this is not read into memory (real ones are kilobytes)."""


class TextSink(NullSink):
    """Keeps the contents of a NAR that is one small regular file (a `.drv`); `text` stays
    None for anything else."""

    def __init__(self) -> None:
        super().__init__()
        self.text: bytes | None = None
        self._buf: bytearray | None = None

    def begin_file(self, path: NarPath, executable: bool, size: int) -> None:
        super().begin_file(path, executable, size)
        if path == () and not executable and size <= MAX_DRV_BYTES:
            self._buf = bytearray()

    def write(self, data: memoryview) -> None:
        if self._buf is not None:
            self._buf += data

    def end_file(self) -> None:
        if self._buf is not None:
            self.text, self._buf = bytes(self._buf), None


def verify_nar(info: NarInfo, nar_file: Path) -> bytes | None:
    """Check that `nar_file` decompresses to a well-formed NAR matching NarHash and NarSize
    (NixError, or OSError when it cannot be read, otherwise). Returns the contents of a `.drv`
    that is one small regular file, else None."""
    checker = NarVerifier(info.nar_hash, info.nar_size, str(info.store_path))
    sink = TextSink() if info.store_path.is_derivation else NullSink()
    parser = NarParser(sink)
    unpack = decompressor(info.compression)
    with nar_file.open("rb") as source:
        while chunk := source.read(READ_CHUNK):
            for piece in unpack.decompress(chunk):
                checker.update(piece)
                parser.feed(piece)
    unpack.finish()
    parser.finish()
    checker.finish()
    return sink.text if isinstance(sink, TextSink) else None


def is_source(info: NarInfo) -> bool:
    """Whether the path is the `source` path of its NarHash and references (the NarHash
    itself is only as good as the check of the NAR against it)."""
    path = info.store_path
    if info.nar_hash.algo != "sha256":
        return False
    others = [r for r in info.references if r != path]
    expected = source_path(
        path.name, info.nar_hash, others, self_ref=len(others) < len(info.references),
        store_dir=path.store_dir,
    )  # fmt: skip
    return expected == path


def is_text(info: NarInfo, contents: bytes | None) -> bool:
    """Whether the path is the text path of `contents` (a `.drv`'s bytes) and its references."""
    if contents is None:
        return False
    path = info.store_path
    return text_path(path.name, contents, info.references, path.store_dir) == path


def content_problem(info: NarInfo, nar_file: Path) -> str | None:
    """None when `nar_file` is the NAR of `info` and its bytes prove the store path (a `.drv`
    or a source), else why not."""
    try:
        contents = verify_nar(info, nar_file)
    except (NixError, OSError) as exc:
        return f"its NAR does not match the narinfo: {exc}"
    if info.store_path.is_derivation:
        if is_text(info, contents):
            return None
        return "a .drv whose contents and references do not hash to its path"
    if is_source(info):
        return None
    return "not a .drv or source whose content proves its path"
