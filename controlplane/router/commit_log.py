"""The token-level commit log: every generated token the router has sent for a request.

A pipeline streams `TokenDelta`s that say where their tokens sit (`position` among the
generated tokens). The log accepts exactly the tokens that extend what it has; tokens it
already has (a resumed pipeline repeating itself) are dropped, and a delta that would leave
a hole is refused, so the client's stream has no gap and no duplicate whatever happens
behind the router.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class GapError(Exception):
    """A delta started past the end of the log: tokens in between were never seen."""


@dataclass(frozen=True)
class Resume:
    """One resumption of a request: how, after how many committed tokens, and when its
    stream broke (`time.monotonic()`; 0 when not known)."""

    mode: str  # "kv" or "reprefill"
    committed: int
    pipeline_id: str
    interrupted_at: float = 0.0
    interrupted_on: str = ""   # the pipeline whose stream broke


@dataclass
class CommitLog:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    max_tokens: int
    tokens: list[int] = field(default_factory=list)
    resumes: list[Resume] = field(default_factory=list)
    mismatches: int = 0

    @property
    def committed(self) -> int:
        return len(self.tokens)

    @property
    def complete(self) -> bool:
        return len(self.tokens) >= self.max_tokens

    def accept(self, position: int, token_ids: Sequence[int]) -> list[int]:
        """Append the part of `token_ids` (starting at generated index `position`) that is
        new, and return it. Raise `GapError` if `position` is past the end."""
        end = len(self.tokens)
        if position > end:
            raise GapError(f"request {self.request_id}: delta at position {position}, "
                           f"but only {end} tokens are committed")
        overlap = list(token_ids[: end - position])
        if overlap != self.tokens[position: position + len(overlap)]:
            # Determinism is broken behind the router; what the client has seen stands.
            self.mismatches += 1
            log.warning("request %s: repeated tokens at %d differ from the committed ones",
                        self.request_id, position)
        fresh = list(token_ids[end - position:])[: self.max_tokens - end]
        self.tokens.extend(fresh)
        return fresh

    def record_resume(self, mode: str, pipeline_id: str, interrupted_at: float = 0.0,
                      interrupted_on: str = "") -> None:
        self.resumes.append(Resume(mode, len(self.tokens), pipeline_id, interrupted_at,
                                   interrupted_on))
