"""What every rank of a pipeline needs to run one step: a plain, picklable description
built by the driver from the scheduler's output and broadcast to the other ranks.
Torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from spotserve.worker.engine.scheduler import SchedulerOutput
from spotserve.worker.engine.sequence import SamplingParams


@dataclass(frozen=True)
class ChunkPlan:
    request_id: str
    token_ids: tuple[int, ...]      # the new tokens (read by the first stage only)
    context_len: int
    block_table: tuple[int, ...]
    sample: SamplingParams | None   # set when this chunk ends at the sequence's last token


@dataclass(frozen=True)
class StepPlan:
    chunks: tuple[ChunkPlan, ...]

    @classmethod
    def of(cls, out: SchedulerOutput) -> StepPlan:
        chunks = []
        for c in out.chunks:
            tokens = c.seq.token_ids[c.start:c.context_len]
            chunks.append(ChunkPlan(c.seq.request_id, tuple(tokens), c.context_len,
                                    tuple(c.seq.block_table),
                                    c.seq.params if c.samples else None))
        return cls(tuple(chunks))

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)
