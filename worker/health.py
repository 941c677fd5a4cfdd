"""The standard gRPC health service (`grpc.health.v1.Health/Check`) without the
grpcio-health-checking dependency: its two messages are one small field each, encoded here
by hand. Kubernetes' gRPC probes and `grpc_health_probe` call it; it needs no token."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

SERVICE = "grpc.health.v1.Health"
CHECK = f"/{SERVICE}/Check"
SERVING, NOT_SERVING = 1, 2


def _decode_service(request: bytes) -> str:
    """HealthCheckRequest{string service = 1}; anything else in it is ignored."""
    if len(request) >= 2 and request[0] == 0x0A and request[1] < 0x80:
        return request[2:2 + request[1]].decode(errors="replace")
    return ""


def handler(is_serving: Callable[[str], bool | None]) -> grpc.GenericRpcHandler:
    """`is_serving(service)`: True/False, or None for a service this server does not know."""

    async def check(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        status = is_serving(_decode_service(request))
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return bytes([0x08, SERVING if status else NOT_SERVING])

    method: Any = grpc.unary_unary_rpc_method_handler(check, request_deserializer=None,
                                                 response_serializer=None)
    return grpc.method_handlers_generic_handler(SERVICE, {"Check": method})


async def check(channel: grpc.aio.Channel, service: str = "", timeout: float = 5.0) -> bool:
    """Client side: True when the server answers SERVING."""
    call: Any = channel.unary_unary(CHECK, request_serializer=None, response_deserializer=None)
    encoded = service.encode()
    request = bytes([0x0A, len(encoded)]) + encoded if encoded else b""
    reply: bytes = await call(request, timeout=timeout)
    return reply == bytes([0x08, SERVING])
