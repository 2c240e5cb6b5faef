"""Fixtures for the fault tests: the mesh tests' simulated nodes, and small tmpfs mounts
(a node's disk that fills up), unmounted at the end of each test."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.niphas_mesh.conftest import start_node

__all__ = ["small_disk", "start_node"]


@pytest.fixture
def small_disk() -> Iterator[Callable[[Path, int], Path]]:
    """Factory: `small_disk(dir, size_mb)` mounts a tmpfs of that size at `dir`."""
    mounted: list[Path] = []

    def mount(where: Path, size_mb: int) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(where)],
            check=True,
        )
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "--lazy", str(where)], check=True)
