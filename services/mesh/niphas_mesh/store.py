"""The node's Nix store as the mesh sees it: which paths are valid, with what signatures.

A catalogue kept in memory (from `nix path-info --json --all`, then updated after every import
and deletion, and rescanned periodically for paths built or collected outside the agent) so
that a narinfo request never waits for a `nix` process. A request for a path the catalogue
lacks looks at a listing of the store directory no older than `LISTING_MAX_AGE_S` (one
listing shared by every miss meanwhile, read in a thread): a host store holds tens of
thousands of entries (~16 ms to list), and clients probing for paths a node lacks are common.
Imports and deletions go through the NixRunner, so Nix itself checks signatures and refuses to
delete live (leased) paths.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from niphas_common.nix.errors import CommandError
from niphas_common.nix.narinfo import NarInfo
from niphas_common.nix.runner import NixRunner, PathInfo, parse_path_info
from niphas_common.nix.signing import TrustedKeys
from niphas_common.nix.store_path import StoreDir, StorePath
from niphas_schemas.types import STORE_DIR

log = logging.getLogger(__name__)
LISTING_MAX_AGE_S = 1.0
"""How stale the store directory's listing may be when a request misses the catalogue."""


@dataclass(frozen=True)
class Change:
    """What a scan found: paths that appeared and paths that went away since the last one."""

    gained: tuple[PathInfo, ...] = ()
    lost: tuple[PathInfo, ...] = ()


@dataclass
class NodeStore:
    """One node's store. `root` empty: the host store; otherwise a chroot store there."""

    root: str
    trusted: TrustedKeys
    runner: NixRunner = field(init=False)
    store_dir: StoreDir = field(init=False)
    real_store: Path = field(init=False)
    _paths: dict[str, PathInfo] = field(default_factory=dict, init=False)
    _signed: dict[str, bool] = field(default_factory=dict, init=False)
    _rendered: dict[tuple[str, str], bytes] = field(default_factory=dict, init=False)
    _listing: dict[str, str] = field(default_factory=dict, init=False)
    _listed_at: float = field(default=float("-inf"), init=False)
    _listing_task: asyncio.Task[None] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        # Nix checks the builder's signatures again when it imports (trusted-public-keys).
        options = {"trusted-public-keys": " ".join(str(k) for k in self.trusted.values())}
        self.runner = NixRunner(store=self.root or None, options=options)
        self.store_dir = StoreDir(root=Path(self.root) if self.root else None)
        # Where the files of every path live (the store dir under a chroot store's root).
        self.real_store = Path(self.root) / STORE_DIR.lstrip("/") if self.root else Path(STORE_DIR)

    # -- the catalogue -----------------------------------------------------------------

    def lookup(self, hash_part: str) -> PathInfo | None:
        return self._paths.get(hash_part)

    def __contains__(self, path: StorePath) -> bool:
        return path.hash_part in self._paths

    def paths(self) -> list[PathInfo]:
        return list(self._paths.values())

    def is_signed(self, info: PathInfo) -> bool:
        """Whether the path carries a valid signature by a trusted key (the builder's)."""
        key = info.path.hash_part
        if key not in self._signed:
            narinfo = self.narinfo(info, "none")
            self._signed[key] = bool(
                info.signatures
                and self.trusted.valid_signatures(narinfo.fingerprint(), info.signatures)
            )
        return self._signed[key]

    def narinfo_text(self, info: PathInfo, compression: str) -> bytes:
        """The rendered narinfo, kept: a closure's lookups arrive by the hundred at once."""
        key = (info.path.hash_part, compression)
        text = self._rendered.get(key)
        if text is None:
            text = self._rendered[key] = self.narinfo(info, compression).render().encode()
        return text

    def _forget(self, hash_part: str) -> None:
        self._signed.pop(hash_part, None)
        self._rendered.pop((hash_part, "none"), None)
        self._rendered.pop((hash_part, "zstd"), None)

    def narinfo(self, info: PathInfo, compression: str) -> NarInfo:
        """The narinfo this node serves for `info`: the builder's signatures, our NAR URL."""
        suffix = ".zst" if compression == "zstd" else ""
        return NarInfo(
            store_path=info.path,
            url=f"nar/{info.path.hash_part}.nar{suffix}",
            nar_hash=info.nar_hash,
            nar_size=info.nar_size,
            compression=compression,
            references=tuple(sorted(info.references)),
            deriver=info.deriver,
            sigs=info.signatures,
            ca=info.ca,
        )

    def real_path(self, path: StorePath) -> Path:
        return self.store_dir.real_path(path)

    async def scan(self) -> Change:
        """Re-read every valid path; report what changed since the last scan."""
        result = await self.runner.arun("nix", "path-info", "--json", "--all")
        fresh = {info.path.hash_part: info for info in parse_path_info(result.json()).values()}
        gained = tuple(i for h, i in fresh.items() if h not in self._paths)
        lost = tuple(i for h, i in self._paths.items() if h not in fresh)
        self._paths = fresh
        for info in lost:
            self._forget(info.path.hash_part)
        return Change(gained, lost)

    async def refresh(self, paths: Iterable[StorePath]) -> list[PathInfo]:
        """Re-read `paths` (after an import, or a narinfo request for a path built since the
        last scan); return those that are valid now and were not before."""
        wanted = [p for p in paths]
        if not wanted:
            return []
        result = await self.runner.arun(
            "nix", "path-info", "--json", *map(str, wanted), check=False
        )
        try:
            infos = parse_path_info(result.json()) if result.stdout.strip() else {}
        except CommandError:
            infos = {}
        new = []
        for info in infos.values():
            if info.path.hash_part not in self._paths:
                new.append(info)
            self._paths[info.path.hash_part] = info
            self._forget(info.path.hash_part)
        return new

    async def find(self, hash_part: str) -> PathInfo | None:
        """The path with this hash part: from the catalogue, or (when its files exist but the
        catalogue has not seen it yet) from Nix."""
        info = self._paths.get(hash_part)
        if info is not None:
            return info
        name = (await self._listed()).get(hash_part)
        if name is None:
            return None
        await self.refresh([StorePath.from_base_name(name)])
        return self._paths.get(hash_part)

    async def _listed(self) -> dict[str, str]:
        """hash part -> entry name in the store directory, listed at most LISTING_MAX_AGE_S
        ago; concurrent callers share one listing."""
        if time.monotonic() - self._listed_at > LISTING_MAX_AGE_S:
            if self._listing_task is None or self._listing_task.done():
                self._listing_task = asyncio.create_task(self._list())
            await asyncio.shield(self._listing_task)
        return self._listing

    async def _list(self) -> None:
        started = time.monotonic()
        try:
            names = await asyncio.to_thread(os.listdir, self.real_store)
        except OSError:
            names = []
        self._listing = {
            n[:32]: n for n in names if len(n) > 33 and n[32] == "-" and not n.endswith(".lock")
        }
        self._listed_at = started

    # -- changing the store ------------------------------------------------------------

    async def import_from(self, cache_url: str, paths: Sequence[StorePath]) -> None:
        """Import `paths` (whose references are valid here or among them) from a binary cache
        we just wrote and verified. Nix checks the signatures and NarHash once more."""
        if not paths:
            return
        dest = ["--to", self.root] if self.root else []
        await self.runner.arun(
            "nix", "copy", "--no-recursive", "--from", cache_url, *dest, *map(str, paths)
        )
        await self.refresh(paths)

    async def delete(self, path: StorePath) -> bool:
        """Delete one path; False when Nix refuses (it is alive: a GC root or a referrer)."""
        result = await self.runner.arun("nix-store", "--delete", str(path), check=False)
        if result.returncode != 0:
            log.info("not deleting %s: %s", path, result.stderr.strip().splitlines()[-1:])
            return False
        info = self._paths.pop(path.hash_part, None)
        self._forget(path.hash_part)
        return info is not None

    def closure(
        self, roots: Iterable[str], pending: Mapping[str, Sequence[StorePath]] | None = None
    ) -> set[str]:
        """Hash parts of `roots` and of everything they reference, transitively: by the
        catalogue's references, or `pending`'s for paths not valid yet."""
        todo = list(roots)
        found: set[str] = set()
        while todo:
            hash_part = todo.pop()
            if hash_part in found:
                continue
            found.add(hash_part)
            info = self._paths.get(hash_part)
            refs = info.references if info is not None else (pending or {}).get(hash_part, ())
            todo.extend(r.hash_part for r in refs)
        return found

    def referrers(self) -> dict[str, set[str]]:
        """hash part -> hash parts of the valid paths that reference it."""
        result: dict[str, set[str]] = {h: set() for h in self._paths}
        for h, info in self._paths.items():
            for ref in info.references:
                if ref.hash_part != h and ref.hash_part in result:
                    result[ref.hash_part].add(h)
        return result

    def usage_percent(self) -> float:
        """Percent of the file system holding the store that is in use."""
        st = os.statvfs(self.real_store)
        total = st.f_blocks * st.f_frsize
        free = st.f_bavail * st.f_frsize
        return 100.0 * (total - free) / total if total else 0.0
