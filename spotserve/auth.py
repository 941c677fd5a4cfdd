"""Shared-token authentication for the internal gRPC services (Worker, Control).

The token comes from `--token-file` (a mounted Kubernetes Secret) or the
`SPOTSERVE_TOKEN` environment variable; calls carry it as `authorization: Bearer <token>`.
An empty token disables the check (local development only).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc

from spotserve.errors import SpotserveError

TOKEN_ENV = "SPOTSERVE_TOKEN"


def load_token(token_file: str | None = None) -> str:
    if token_file:
        try:
            return Path(token_file).read_text().strip()
        except OSError as exc:
            raise SpotserveError(f"cannot read token file {token_file}: {exc.strerror}") from None
    return os.environ.get(TOKEN_ENV, "").strip()


def call_metadata(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")] if token else []


class BearerCheck:
    """Accept `Bearer <key>` for any of the keys; accept everything when there are none.
    The internal services use it with the one shared token, the router's public side with
    its API keys."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = [k.encode() for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def allows(self, authorization: str | None) -> bool:
        if not self._keys:
            return True
        if not authorization or not authorization.startswith("Bearer "):
            return False
        given = authorization[len("Bearer "):].strip().encode()
        return any(hmac.compare_digest(given, key) for key in self._keys)

    def allows_metadata(self, metadata: Any) -> bool:
        """`allows` applied to gRPC call metadata."""
        value = next((v for k, v in metadata or () if k == "authorization"), None)
        return self.allows(value if isinstance(value, str) else None)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Reject every call without the shared token with UNAUTHENTICATED, except the methods
    in `open_methods` (full names, e.g. the gRPC health check kubelet probes call)."""

    def __init__(self, token: str, open_methods: frozenset[str] = frozenset()) -> None:
        self._check = BearerCheck([token])
        self._open = open_methods

        async def deny(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "missing or wrong token in 'authorization' metadata")

        self._deny_unary: Any = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream: Any = grpc.unary_stream_rpc_method_handler(deny)

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
            details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if details.method in self._open or \
                self._check.allows_metadata(details.invocation_metadata):
            return handler
        if handler is not None and handler.response_streaming:
            return self._deny_stream
        return self._deny_unary
