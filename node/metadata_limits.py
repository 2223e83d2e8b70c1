"""Calls with too much metadata refused before any handler runs, in words.

What a gateway's call carries is a handful of entries (authorization, request
id, user agent) and about 2 KiB. The transport admits far more
(``node.server.SERVER_OPTIONS``) so that an excess reaches this check and is
refused with RESOURCE_EXHAUSTED and a message: gRPC's own refusal of too much
metadata lists every entry and, for many small ones, that list is too long for
its status message, which then arrives empty.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from node.service import NodeService

MAX_METADATA_ENTRIES = 64
MAX_METADATA_BYTES = 16 * 1024


def metadata_excess(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    """Why a call's metadata is refused, in words, or '' (sizes counted as HTTP/2 does: +32 an entry)."""
    entries = tuple(metadata or ())
    if len(entries) > MAX_METADATA_ENTRIES:
        return (f"request carries {len(entries):,} metadata entries (headers); this node accepts "
                f"at most {MAX_METADATA_ENTRIES}")
    size = sum(len(key) + len(value) + 32 for key, value in entries)
    if size > MAX_METADATA_BYTES:
        return f"request metadata (headers) is {size:,} bytes; this node accepts at most {MAX_METADATA_BYTES:,}"
    return ""


class MetadataLimits(grpc.aio.ServerInterceptor):
    """Refuses calls with too much metadata, before any handler runs, with
    RESOURCE_EXHAUSTED and a message that says so; audited like every refusal."""

    def __init__(self, service: NodeService):
        self._service = service

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        reason = metadata_excess(details.invocation_metadata)
        if handler is None or not reason:
            return handler
        service, method = self._service, details.method.rsplit("/", 1)[-1]

        async def refuse(_request: object, context: grpc.aio.ServicerContext) -> None:
            await service.refuse_early(context, method, grpc.StatusCode.RESOURCE_EXHAUSTED, reason)

        async def refuse_stream(request: object, context: grpc.aio.ServicerContext) -> AsyncIterator[object]:
            await refuse(request, context)
            yield None  # pragma: no cover - abort raised; this makes it a response stream

        make = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}
        behaviour = refuse_stream if handler.response_streaming else refuse
        return make[handler.request_streaming, handler.response_streaming](behaviour)
