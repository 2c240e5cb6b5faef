"""The binary cache's tests again on uvloop, as `niphas mesh` runs (NIPHAS_MESH_EVENT_LOOP):
whole NARs written to the socket in blocking mode (uvloop's socket), the cache directory's
files and a NAR still downloading relayed by sendfile from a sender thread (uvloop has no
`loop.sendfile`), a corrupt one cut short and fetched elsewhere, narinfos,
HEAD, ranges, 404/405 and the ops endpoints, a stock `nix copy` and `nix-store -r`."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from tests.niphas_mesh.test_fan_out import (
    test_a_corrupt_download_streamed_on_is_rejected_and_fetched_elsewhere,
    test_a_follower_streams_from_a_node_still_fetching,
)
from tests.niphas_mesh.test_serve import (
    test_cache_dir_files_and_compressed_own_paths,
    test_http_surface,
    test_stock_nix_copy_and_substitute_from_a_node,
)

pytestmark = [pytest.mark.nix, pytest.mark.root]

__all__ = [
    "test_a_corrupt_download_streamed_on_is_rejected_and_fetched_elsewhere",
    "test_a_follower_streams_from_a_node_still_fetching",
    "test_cache_dir_files_and_compressed_own_paths",
    "test_http_surface",
    "test_stock_nix_copy_and_substitute_from_a_node",
]


async def test_the_tests_here_run_on_uvloop() -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
