"""A request's state inside the engine: its tokens, sampling parameters and cache blocks.

Torch-free. A request is fully described by its token ids (prompt + generated) and, when
its KV cache survives, the cache of its first `num_computed` tokens: that is all a
migration needs to move, and all a resume needs to continue at the exact token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, StrEnum

from spotserve.errors import SpotserveError


class SequenceStatus(Enum):
    WAITING = "waiting"    # needs (re-)prefill: some tokens have no cache yet, none scheduled
    RUNNING = "running"    # holds cache blocks; decodes (or continues a chunked prefill)
    FINISHED = "finished"


class FinishReason(StrEnum):
    LENGTH = "length"      # max_tokens or the model's context length reached
    STOP = "stop"          # EOS or a stop token id sampled
    ABORT = "abort"


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. temperature 0 is greedy; `seed` keys the per-position
    random stream, so a request samples the same tokens wherever and with whatever it runs."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0          # 0: no top-k cut
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise SpotserveError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise SpotserveError("temperature must not be negative")
        if self.top_k < 0:
            raise SpotserveError("top_k must not be negative")
        if not 0 < self.top_p <= 1:
            raise SpotserveError("top_p must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0               # leading tokens whose KV is in the cache
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise SpotserveError(f"request {self.request_id}: empty prompt")

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass
class RequestState:
    """What survives a request's move between pipelines: its tokens, and how many of them
    (`num_computed`, from the first) the KV cache its ranks kept covers."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    params: SamplingParams
    num_computed: int = 0

    @classmethod
    def of(cls, seq: Sequence) -> RequestState:
        return cls(seq.request_id, list(seq.prompt_token_ids), list(seq.output_token_ids),
                   seq.params)
