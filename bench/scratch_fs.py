"""A scratch ext4 file system with a journal, loop-mounted, for the stores a benchmark writes.

Node and client stores are where imports create thousands of files. The root file system of
the project's machines is ext4 without a journal; there the kernel checks every inode it
allocates against recent deletions, and after a benchmark deleted thousands of files a file
creation costs up to ~0.7 ms of system time instead of ~20 us, varying from run to run with
which block group a directory lands in. Node disks have a journal; a fresh one on a sparse
file keeps the measurement about the code under test. Falls back to a plain directory (and
says so) when it cannot be made: not root, or no `mkfs.ext4`.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def journaled_ext4(where: Path, size_gb: int) -> Iterator[tuple[Path, str]]:
    """Yield (mount point, description); the file system and its image are gone after."""
    image = where.with_suffix(".img")
    where.mkdir(parents=True, exist_ok=True)
    mounted = False
    try:
        mkfs = shutil.which("mkfs.ext4")
        if mkfs is not None:
            with open(image, "wb") as f:
                f.truncate(size_gb << 30)  # sparse: only what is written takes disk
            made = subprocess.run([mkfs, "-q", "-F", str(image)], capture_output=True)
            if made.returncode == 0:
                mount = subprocess.run(
                    ["mount", "-o", "loop", str(image), str(where)], capture_output=True
                )
                mounted = mount.returncode == 0
        if mounted:
            yield where, f"stores on a fresh journaled ext4 ({size_gb} GB sparse loop image)"
        else:
            yield where, "stores on the machine's own file system (no loop ext4: not root?)"
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(where)], check=False)
        image.unlink(missing_ok=True)
