"""The tests of this directory run on uvloop, the event loop `niphas eval` runs on."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import uvloop
from pytest_asyncio.plugin import LoopFactory


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, LoopFactory]:
    return {"uvloop": uvloop.new_event_loop}
