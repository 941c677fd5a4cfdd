"""Checks on a generation request before it is queued. Each failure names its field.

Both frontends express a request as prompt token ids plus a `SamplingParams` message; the
HTTP frontend checks JSON types itself, then everything meets here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from spotserve.v1 import common_pb2

from .errors import RouterError, invalid

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_REQUEST_ID_LENGTH = 128


@dataclass(frozen=True)
class ModelLimits:
    """What the served model accepts."""

    name: str
    max_context: int
    vocab_size: int


def check_model(requested: str, limits: ModelLimits) -> None:
    if requested and requested != limits.name:
        raise invalid("model", f"unknown model {requested!r}; this router serves "
                               f"{limits.name!r}")


def check_request_id(request_id: str) -> None:
    if len(request_id) > MAX_REQUEST_ID_LENGTH:
        raise invalid("request_id", f"at most {MAX_REQUEST_ID_LENGTH} characters")
    if request_id and not request_id.isprintable():
        raise invalid("request_id", "must be printable text")


def check_prompt(token_ids: Sequence[int], limits: ModelLimits) -> None:
    if not token_ids:
        raise invalid("prompt", "must not be empty")
    _check_vocab("prompt", token_ids, limits)
    if len(token_ids) >= limits.max_context:
        raise invalid("prompt", f"{len(token_ids)} tokens leave no room to generate in the "
                                f"model's context of {limits.max_context} tokens")


def check_sampling(sampling: common_pb2.SamplingParams, prompt_tokens: int,
                   limits: ModelLimits) -> None:
    """Raise `RouterError` (INVALID_ARGUMENT) naming the first bad field."""
    if sampling.max_tokens <= 0:
        raise invalid("max_tokens", f"must be > 0, got {sampling.max_tokens}")
    if prompt_tokens + sampling.max_tokens > limits.max_context:
        raise invalid("max_tokens", f"prompt ({prompt_tokens} tokens) + max_tokens "
                                    f"({sampling.max_tokens}) exceeds the model's context of "
                                    f"{limits.max_context} tokens")
    if sampling.HasField("temperature"):
        _check_range("temperature", sampling.temperature, low=0.0, high=100.0)
    if sampling.HasField("top_p") and not 0.0 < sampling.top_p <= 1.0:
        raise invalid("top_p", f"must be in (0, 1], got {sampling.top_p}")
    if sampling.HasField("top_k") and sampling.top_k < 0:
        raise invalid("top_k", f"must be >= 0 (0 = no limit), got {sampling.top_k}")
    _check_vocab("stop_token_ids", sampling.stop_token_ids, limits)
    _check_stop_strings(sampling.stop)


def _check_range(field: str, value: float, *, low: float, high: float) -> None:
    if not math.isfinite(value) or not low <= value <= high:
        raise invalid(field, f"must be in [{low:g}, {high:g}], got {value}")


def _check_vocab(field: str, token_ids: Sequence[int], limits: ModelLimits) -> None:
    for token in token_ids:
        if not 0 <= token < limits.vocab_size:
            raise invalid(field, f"token id {token} is outside the vocabulary "
                                 f"(size {limits.vocab_size})")


def _check_stop_strings(stop: Sequence[str]) -> None:
    if len(stop) > MAX_STOP_STRINGS:
        raise invalid("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    for text in stop:
        if not text:
            raise invalid("stop", "stop strings must not be empty")
        if len(text) > MAX_STOP_LENGTH:
            raise invalid("stop", f"each stop string has at most {MAX_STOP_LENGTH} characters")


def validate(model: str, request_id: str, prompt_token_ids: Sequence[int],
             sampling: common_pb2.SamplingParams, limits: ModelLimits) -> None:
    """All checks, in the order a user would fix them."""
    check_model(model, limits)
    check_request_id(request_id)
    check_prompt(prompt_token_ids, limits)
    check_sampling(sampling, len(prompt_token_ids), limits)


__all__ = ["ModelLimits", "RouterError", "validate"]
