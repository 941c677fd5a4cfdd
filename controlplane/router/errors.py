"""Errors a request can end with, independent of the protocol that carries them.

Each frontend maps `RouterError.kind` to its own status: a gRPC status code or an HTTP
status with an OpenAI-style error body.
"""

from __future__ import annotations

from enum import Enum


class ErrorKind(Enum):
    INVALID_ARGUMENT = "invalid_argument"
    ALREADY_EXISTS = "already_exists"
    NOT_FOUND = "not_found"
    ABORTED = "aborted"          # another stream took the request over
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    UNAUTHENTICATED = "unauthenticated"
    INTERNAL = "internal"


class RouterError(Exception):
    """A request failed in a way the client should hear about, with a clear message."""

    def __init__(self, kind: ErrorKind, message: str, *, field: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.field = field
        self.retry_after = retry_after


def invalid(field: str, message: str) -> RouterError:
    """Bad input; the message starts with the field's name."""
    return RouterError(ErrorKind.INVALID_ARGUMENT, f"{field}: {message}", field=field)
