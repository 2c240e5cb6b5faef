"""Fixtures for the spine tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from niphas_schemas import PushReceived


@pytest.fixture
def push_event() -> Callable[..., PushReceived]:
    def make(delivery_id: str = "delivery-1", **fields: Any) -> PushReceived:
        return PushReceived(
            forge="github",
            repository="https://git.example.test/acme/app.git",
            ref="refs/heads/main",
            commit="0123456789abcdef0123456789abcdef01234567",
            delivery_id=delivery_id,
            **fields,
        )

    return make
