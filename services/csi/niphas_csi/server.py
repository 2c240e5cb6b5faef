"""The gRPC edge: the unix socket server, bounded concurrency, and the one place where errors
become CSI status codes."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeAlias

import grpc

from niphas_common.errors import TransientError
from niphas_common.nix.errors import NixError

from .errors import (
    Conflict,
    FetchDeadline,
    InvalidRequest,
    MountFailed,
    PathsUnavailable,
    VolumeError,
)
from .identity import IdentityService
from .node import NodeService
from .proto import csi_pb2_grpc
from .server_types import Context

log = logging.getLogger(__name__)

STATUS: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (Conflict, grpc.StatusCode.ALREADY_EXISTS),
    (FetchDeadline, grpc.StatusCode.DEADLINE_EXCEEDED),
    (PathsUnavailable, grpc.StatusCode.UNAVAILABLE),
    (TransientError, grpc.StatusCode.UNAVAILABLE),
    (MountFailed, grpc.StatusCode.INTERNAL),
    (VolumeError, grpc.StatusCode.INTERNAL),
    (NixError, grpc.StatusCode.INTERNAL),
    (OSError, grpc.StatusCode.INTERNAL),
)
"""Most specific first. Anything else is a bug: INTERNAL, logged with its traceback."""


def status_for(exc: BaseException) -> grpc.StatusCode:
    for kind, code in STATUS:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class _Translate(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        # Our servicers are coroutines; the stubs type the handler as a plain function.
        inner: Callable[[Any, Context], Awaitable[Any]] = handler.unary_unary  # type: ignore[assignment]
        method = details.method

        async def call(request: Any, context: Context) -> Any:
            try:
                return await inner(request, context)
            except Exception as exc:
                code = status_for(exc)
                if code is grpc.StatusCode.INTERNAL:
                    log.exception("%s failed", method)
                else:
                    log.info("%s: %s: %s", method, code.name, exc)
                await context.abort(code, str(exc) or type(exc).__name__)

        return grpc.unary_unary_rpc_method_handler(
            call,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def socket_path(endpoint: str) -> Path:
    if not endpoint.startswith("unix://"):
        raise ValueError(f"endpoint {endpoint!r} must be unix:///path/to/csi.sock")
    return Path(endpoint[len("unix://") :])


async def start_server(
    endpoint: str, identity: IdentityService, node: NodeService, max_concurrent_rpcs: int
) -> grpc.aio.Server:
    path = socket_path(endpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a socket left by the previous run
    server = grpc.aio.server(
        interceptors=[_Translate()], maximum_concurrent_rpcs=max_concurrent_rpcs
    )
    csi_pb2_grpc.add_IdentityServicer_to_server(identity, server)  # type: ignore[no-untyped-call]
    csi_pb2_grpc.add_NodeServicer_to_server(node, server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"unix://{path}")
    await server.start()
    return server
