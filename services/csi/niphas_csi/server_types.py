"""Type names shared by the servicers and the gRPC edge."""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
"""The stubs make it generic; at runtime it is not, hence the string."""
