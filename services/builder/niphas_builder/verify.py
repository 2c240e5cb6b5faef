"""Checking what a build pod uploaded before anything is signed.

A build pod runs untrusted code, so its uploads are claims, not facts. Each uploaded narinfo
is accepted only when:
- its store path is vouched for by content (`provenance.py`): a `.drv` or a source whose
  path is the one its bytes hash to, or an output of a derivation in the job's verified
  derivation closure; so a pod cannot get a signature for anybody else's path;
- its NAR, decompressed, is a well-formed NAR whose sha256 and size are the narinfo's NarHash
  and NarSize (recomputed here from the bytes, never taken from the pod);
- every reference is a well-formed store path that is uploaded too or already in the cache,
  so a signed path never points at something nobody can fetch.
Signatures the pod put into a narinfo are dropped: the only one that counts is ours.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from niphas_common.nix import content_proof
from niphas_common.nix.errors import NixError
from niphas_common.nix.narinfo import NarInfo
from niphas_common.nix.store_path import StorePath

NAR_URL_RE = re.compile(r"^nar/[0-9a-z]{52}\.nar(\.zst)?$")
"""Where Nix puts a NAR in a binary cache (`nar/<file hash>.nar[.zst]`): only these names are
accepted, so a narinfo cannot point the builder at another file."""
COMPRESSIONS = ("zstd", "none")
SOURCE_CA = "fixed:r:sha256:"


class UploadRefused(Exception):
    """An upload that must not be signed; the message says which path and why."""


@dataclass(frozen=True)
class Upload:
    info: NarInfo
    nar_file: Path


def door_problem(info: NarInfo, outputs: frozenset[str] | None) -> str | None:
    """Why the staging endpoint turns a narinfo away at once, if it does. With the job's
    outputs known (the builder had its `.drv`), only those, `.drv` files and sources get in;
    without, anything may be uploaded and `publish` decides."""
    path = info.store_path
    if outputs is None or str(path) in outputs or path.is_derivation:
        return None
    if (info.ca or "").startswith(SOURCE_CA):
        return None  # claims to be a source: checked against its content when published
    return f"{path} is not an output of this build"


def read_uploads(directory: Path) -> dict[str, Upload]:
    """The narinfos uploaded into `directory`, parsed (what they may be is `provenance`'s)."""
    uploads: dict[str, Upload] = {}
    for file in sorted(directory.glob("*.narinfo")):
        info = parse_narinfo(file.read_bytes(), file.name)
        uploads[str(info.store_path)] = Upload(info, directory / info.url)
    return uploads


def parse_narinfo(data: bytes, file_name: str) -> NarInfo:
    """A narinfo a pod sent as `<file_name>`: parseable, named after its own store path, with
    a NAR URL inside the staging area and a compression we read."""
    try:
        info = NarInfo.parse(data.decode())
    except (UnicodeDecodeError, NixError) as exc:
        raise UploadRefused(f"{file_name}: not a valid narinfo: {exc}") from exc
    if file_name != f"{info.store_path.hash_part}.narinfo":
        raise UploadRefused(f"{file_name} describes another path, {info.store_path}")
    if not NAR_URL_RE.match(info.url):
        raise UploadRefused(f"{info.store_path}: NAR URL {info.url[:80]!r} is not nar/<hash>.nar")
    if info.compression not in COMPRESSIONS:
        raise UploadRefused(f"{info.store_path}: compression {info.compression!r} not accepted")
    return info


def verify_nar(upload: Upload) -> bytes | None:
    """The NAR file decompresses to a well-formed NAR matching NarHash and NarSize. Returns
    the contents of a NAR that is one small regular file (what a `.drv` is), else None."""
    info = upload.info
    what = str(info.store_path)
    try:
        return content_proof.verify_nar(info, upload.nar_file)
    except OSError as exc:
        raise UploadRefused(f"{what}: its NAR {info.url} was not uploaded") from exc
    except NixError as exc:
        raise UploadRefused(f"{what}: uploaded NAR does not match its narinfo: {exc}") from exc


async def check_complete(
    uploads: dict[str, Upload],
    outputs: Iterable[str],
    in_cache: Callable[[StorePath], Awaitable[bool]],
) -> None:
    """Every output and every reference of an upload is uploaded or already in the cache."""
    for output in outputs:
        if output not in uploads and not await in_cache(StorePath.parse(output)):
            raise UploadRefused(f"output {output} was neither uploaded nor in the cache")
    for path, upload in uploads.items():
        for ref in upload.info.references:
            if str(ref) == path or str(ref) in uploads:
                continue
            if not await in_cache(ref):
                raise UploadRefused(f"{path} references {ref}, which is nowhere to fetch")


def unsigned(info: NarInfo) -> NarInfo:
    """The narinfo without the signatures the pod put in (they vouch for nothing)."""
    return replace(info, sigs=())
