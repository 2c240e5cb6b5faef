"""Mount system calls (through libc, no `mount` processes: a publish must take milliseconds)
and the kernel's own list of mounts, /proc/self/mountinfo."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from dataclasses import dataclass
from pathlib import Path

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8

READ_ONLY = MS_RDONLY | MS_NOSUID | MS_NODEV
"""Every mount this driver makes carries these flags."""

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p] * 3 + [ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _check(result: int, what: str, path: str | os.PathLike[str]) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", os.fspath(path))


def mount(
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    fstype: str | None,
    flags: int,
    data: str | None = None,
) -> None:
    _check(
        _libc.mount(
            os.fsencode(source),
            os.fsencode(target),
            fstype.encode() if fstype else None,
            flags,
            data.encode() if data else None,
        ),
        f"mount {fstype or 'bind'}",
        target,
    )


def umount(target: str | os.PathLike[str], lazy: bool = False) -> None:
    """Unmount; a busy mount is detached lazily (it goes once the last user leaves). Never
    through a symlink: a target swapped for one must not unmount what it points at."""
    path = os.fsencode(target)
    if _libc.umount2(path, UMOUNT_NOFOLLOW | (MNT_DETACH if lazy else 0)) == 0:
        return
    err = ctypes.get_errno()
    if err == errno.EBUSY and not lazy:
        _check(_libc.umount2(path, UMOUNT_NOFOLLOW | MNT_DETACH), "umount (lazy)", target)
        return
    raise OSError(err, f"umount: {os.strerror(err)}", os.fspath(target))


def umount_if_mounted(target: str | os.PathLike[str]) -> bool:
    """Unmount the top mount at `target`; False when nothing is mounted there (or it is gone)."""
    try:
        umount(target)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOENT):  # not a mount point; no such path
            return False
        raise
    return True


def bind_read_only(source: Path, target: Path) -> None:
    """Bind `source` at `target`, then make that mount read-only, nosuid, nodev (a bind
    ignores flags; they need the remount)."""
    mount(source, target, None, MS_BIND)
    try:
        mount("none", target, None, MS_REMOUNT | MS_BIND | READ_ONLY)
    except BaseException:
        umount(target, lazy=True)
        raise


def make_private_mountpoint(path: Path) -> None:
    """Turn `path` into a private mount of itself (if it is not already a mount), so what is
    mounted below it never propagates. On a host whose / is a shared mount (systemd's default),
    a mount made under a shared parent is copied into every peer mount namespace (containers,
    kubelet's pods) and can never be cleanly unmounted from here; the staging area must be
    private."""
    if not is_mountpoint(path):
        mount(path, path, None, MS_BIND)
    mount("none", path, None, MS_PRIVATE)


@dataclass(frozen=True, slots=True)
class MountInfo:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    mount_point: str
    options: frozenset[str]
    fstype: str
    source: str
    super_options: frozenset[str]


def _unescape(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in paths as octal escapes.
    if "\\" not in field:
        return field
    out = bytearray()
    raw = field.encode()
    i = 0
    while i < len(raw):
        if raw[i] == 0x5C and raw[i + 1 : i + 4].isdigit() and i + 4 <= len(raw):
            out.append(int(raw[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


def parse_mountinfo(text: str) -> list[MountInfo]:
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split(" ")
        fstype, source, super_options = [*right.split(" "), "", ""][:3]
        mounts.append(
            MountInfo(
                mount_id=int(fields[0]),
                mount_point=_unescape(fields[4]),
                options=frozenset(fields[5].split(",")),
                fstype=fstype,
                source=_unescape(source),
                super_options=frozenset(super_options.split(",")),
            )
        )
    return mounts


def mounts() -> list[MountInfo]:
    return parse_mountinfo(Path("/proc/self/mountinfo").read_text())


def mounted_at(path: str | os.PathLike[str]) -> list[MountInfo]:
    """The mounts stacked exactly at `path` (oldest first)."""
    target = os.fspath(path)
    return [m for m in mounts() if m.mount_point == target]


def is_mountpoint(path: str | os.PathLike[str]) -> bool:
    return bool(mounted_at(path))
