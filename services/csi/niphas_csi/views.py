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

import contextlib
import errno
import hashlib
import os
import shutil
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path

from niphas_common.nix.store_path import StoreDir
from niphas_schemas.types import STORE_DIR, STORE_PATH_RE

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
        self.real_store = real_store
        self.lower = real_store.parent
        self.redirect_prefix = f"/{real_store.name}/"
        for path in (self.meta_root, self.lower):
            if ":" in str(path) or "," in str(path):
                raise ValueError(f"{path} cannot be an overlayfs layer (':' or ',' in it)")
        self.refs: dict[str, int] = {}
        self.mounted: set[str] = set()
        self._umask = _process_umask()

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
        _remove_meta(self.meta_root / key)

    def _build(self, key: str, closure: Sequence[str]) -> None:
        meta = self.meta_root / key
        _remove_meta(meta)  # a half-built one from a crash
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
        """The meta layer; returns the closure's regular-file paths (they need a bind).

        Every call works relative to open directories and with plain strings: this loop is
        most of a first publish (a few syscalls per closure path), and resolving both long
        paths for each of them cost as much again."""
        files = []
        names = set()
        prefix = f"{meta}/"
        redirect = self.redirect_prefix
        store_fd = os.open(self.real_store, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        meta_fd = os.open(meta, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for path in closure:
                base = self._base_name(path)
                names.add(base)
                try:
                    st = os.stat(base, dir_fd=store_fd, follow_symlinks=False)
                except FileNotFoundError:
                    raise FileNotFoundError(
                        errno.ENOENT, "valid in the store's database but not on disk",
                        str(self.real_store / base),
                    ) from None  # fmt: skip
                mode = stat.S_IMODE(st.st_mode)
                if stat.S_ISDIR(st.st_mode):
                    os.mkdir(base, mode, dir_fd=meta_fd)
                    os.setxattr(prefix + base, REDIRECT_XATTR, (redirect + base).encode())
                    # The merged directory shows the top layer's metadata: make it the store's.
                    if mode & self._umask:
                        os.chmod(base, mode, dir_fd=meta_fd)
                    os.utime(base, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=meta_fd)
                elif stat.S_ISLNK(st.st_mode):
                    os.symlink(os.readlink(base, dir_fd=store_fd), base, dir_fd=meta_fd)
                else:
                    os.close(os.open(base, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC,
                                     mode, dir_fd=meta_fd))  # fmt: skip
                    if mode & self._umask:
                        os.chmod(base, mode, dir_fd=meta_fd)
                    files.append(path)
            for name in os.listdir(self.lower):
                if name not in names:  # hide `store`, `var`...: only the closure shows
                    os.mknod(name, stat.S_IFCHR, os.makedev(0, 0), dir_fd=meta_fd)
        finally:
            os.close(meta_fd)
            os.close(store_fd)
        os.chmod(meta, 0o555)
        return files

    def _base_name(self, path: str) -> str:
        """`<hash>-<name>` of a closure path; anything but a path of this store is refused."""
        if self.store.path == STORE_DIR and STORE_PATH_RE.fullmatch(path):
            return path[len(STORE_DIR) + 1 :]  # the common case, without parsing twice
        return self.store.parse(path).base_name


def _process_umask() -> int:
    """The umask, read without changing it (os.umask would, for every thread at once)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o777  # unknown: always set the mode explicitly


def _remove_meta(meta: Path) -> None:
    """Remove a meta layer: its entries are empty dirs, whiteouts, symlinks and empty files, so
    one rmdir or unlink each does (shutil.rmtree opens every directory first)."""
    try:
        fd = os.open(meta, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        with os.scandir(fd) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    os.rmdir(entry.name, dir_fd=fd)
                else:
                    os.unlink(entry.name, dir_fd=fd)
    except OSError:
        shutil.rmtree(meta, ignore_errors=True)  # something else in there: the slow way
    finally:
        os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(meta)
