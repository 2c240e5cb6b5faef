"""Views: one read-only mount per closure per node that shows exactly that closure.

A view is an overlayfs with no upper layer (so the kernel makes it read-only) over two lower
layers: the node's `<store root>/nix` at the bottom, and on top a small "meta" directory on a
tmpfs holding, per closure path, an empty directory whose `trusted.overlay.redirect` xattr
points the lookup at `/store/<hash>-<name>` below, plus a whiteout for every entry of `nix/`
itself, so nothing but the closure is visible. Files are the node store's own (same inodes,
same page cache, no copies), and a view is built with a few syscalls per path: milliseconds
for hundreds of paths, and ONE mount whatever the closure size (mounts per node are bounded by
fs.mount-max). The rare store path that is a regular file cannot be redirected; it gets a bind
mount of its own inside the view. Symlink store paths are recreated as symlinks.

Views live in a private staging directory (on a host whose / is a shared mount, a mount made
there would otherwise propagate into every peer namespace: see `mounts.make_private_mountpoint`;
nothing made here propagates anywhere), are shared by every volume with the same closure, and are
refcounted; a pod's target is a bind of its view.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path

from niphas_common.nix.store_path import StoreDir

from . import mounts

REDIRECT_XATTR = "trusted.overlay.redirect"
OVERLAY_SOURCE = "niphas-csi"
"""The `source` of every view mount in mountinfo, so a restart can find its own views."""


def view_key(closure: Iterable[str]) -> str:
    """The same closure always gets the same view, whichever volume asks."""
    return hashlib.sha256("\n".join(sorted(closure)).encode()).hexdigest()[:32]


class Views:
    def __init__(self, staging: Path, store: StoreDir) -> None:
        self.staging = staging
        self.meta_root = staging / "meta"
        self.view_root = staging / "views"
        self.store = store
        real_store = store.real_path(f"{store.path}/{'0' * 32}-x").parent
        self.lower = real_store.parent
        self.redirect_prefix = f"/{real_store.name}/"
        for path in (self.meta_root, self.lower):
            if ":" in str(path) or "," in str(path):
                raise ValueError(f"{path} cannot be an overlayfs layer (':' or ',' in it)")
        self.refs: dict[str, int] = {}
        self.mounted: set[str] = set()

    def prepare(self) -> None:
        """Make the staging area private and give it a tmpfs for the meta layers; then find
        the views a previous run left mounted."""
        self.staging.mkdir(parents=True, exist_ok=True)
        mounts.make_private_mountpoint(self.staging)
        self.meta_root.mkdir(exist_ok=True)
        self.view_root.mkdir(exist_ok=True)
        if not mounts.is_mountpoint(self.meta_root):
            mounts.mount("tmpfs", self.meta_root, "tmpfs", mounts.MS_NOSUID | mounts.MS_NODEV,
                         "mode=0755")  # fmt: skip
        prefix = str(self.view_root) + "/"
        self.mounted = {
            m.mount_point[len(prefix) :]
            for m in mounts.mounts()
            if m.mount_point.startswith(prefix) and m.source == OVERLAY_SOURCE
        }

    def path(self, key: str) -> Path:
        return self.view_root / key

    def ensure(self, key: str, closure: Sequence[str]) -> Path:
        """The view of `closure`, built if it is not mounted (users are counted apart)."""
        if key not in self.mounted:
            self._build(key, closure)
            self.mounted.add(key)
        return self.path(key)

    def acquire(self, key: str, closure: Sequence[str]) -> Path:
        """One more user of the view of `closure`; built on first use."""
        view = self.ensure(key, closure)
        self.refs[key] = self.refs.get(key, 0) + 1
        return view

    def release(self, key: str) -> None:
        """One user less; the last one tears the view down."""
        left = self.refs.get(key, 0) - 1
        if left > 0:
            self.refs[key] = left
            return
        self.refs.pop(key, None)
        self.teardown(key)

    def teardown(self, key: str) -> None:
        view = self.path(key)
        if key in self.mounted or mounts.is_mountpoint(view):
            mounts.umount(view)  # busy (a file bind inside): detached lazily with its binds
        self.mounted.discard(key)
        if view.exists():
            view.rmdir()
        shutil.rmtree(self.meta_root / key, ignore_errors=True)

    def _build(self, key: str, closure: Sequence[str]) -> None:
        meta = self.meta_root / key
        shutil.rmtree(meta, ignore_errors=True)  # a half-built one from a crash
        meta.mkdir()
        files = self._write_meta(meta, closure)
        view = self.path(key)
        view.mkdir(exist_ok=True)
        options = f"lowerdir={meta}:{self.lower},redirect_dir=follow"
        mounts.mount(OVERLAY_SOURCE, view, "overlay", mounts.READ_ONLY, options)
        try:
            for path in files:
                mounts.bind_read_only(self.store.real_path(path), view / os.path.basename(path))
        except BaseException:
            self.teardown(key)
            raise

    def _write_meta(self, meta: Path, closure: Sequence[str]) -> list[str]:
        """The meta layer; returns the closure's regular-file paths (they need a bind)."""
        files = []
        names = set()
        for path in closure:
            base = os.path.basename(path)
            names.add(base)
            real = self.store.real_path(path)
            st = os.lstat(real)
            entry = meta / base
            if stat.S_ISDIR(st.st_mode):
                entry.mkdir()
                os.setxattr(entry, REDIRECT_XATTR, (self.redirect_prefix + base).encode())
                # The merged directory shows the top layer's metadata: make it the store's.
                os.chmod(entry, stat.S_IMODE(st.st_mode))
                os.utime(entry, ns=(st.st_atime_ns, st.st_mtime_ns))
            elif stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(real), entry)
            else:
                entry.touch(mode=stat.S_IMODE(st.st_mode))
                files.append(path)
        for name in os.listdir(self.lower):
            if name not in names:  # hide `store`, `var`...: only the closure shows
                os.mknod(meta / name, stat.S_IFCHR, os.makedev(0, 0))
        os.chmod(meta, 0o555)
        return files
