"""Continuous batching: which sequences run in the next step, and how many tokens each.

Torch-free. Each step has a token budget. Running sequences go first, in arrival order:
a decoding one takes 1 token, one in a chunked prefill takes what the budget leaves. When
the cache runs out of blocks the youngest running sequence is preempted by recompute (its
blocks are freed; it waits to be re-prefilled from its token ids, samples unchanged).
Then waiting sequences are admitted, oldest first, while budget, batch slots and blocks
last. New requests thus join between decode steps.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from spotserve.errors import SpotserveError
from spotserve.worker.engine.block_manager import BlockManager
from spotserve.worker.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledChunk:
    """`num_new` tokens of `seq` from token `start` (its cached length when scheduled);
    `samples` when the chunk reaches the sequence's last token, so a new one is sampled."""

    seq: Sequence
    start: int
    num_new: int
    samples: bool

    @classmethod
    def of(cls, seq: Sequence, num_new: int) -> ScheduledChunk:
        end = seq.num_computed + num_new
        return cls(seq, seq.num_computed, num_new, end == seq.num_tokens)

    @property
    def context_len(self) -> int:
        return self.start + self.num_new


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_new for c in self.chunks)

    @property
    def empty(self) -> bool:
        return not self.chunks


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 32
    max_batched_tokens: int = 2048
    max_model_len: int = 4096

    def __post_init__(self) -> None:
        if min(self.max_num_seqs, self.max_batched_tokens, self.max_model_len) < 1:
            raise SpotserveError("scheduler limits must be positive")


class Scheduler:
    def __init__(self, blocks: BlockManager, config: SchedulerConfig | None = None,
                 eos_token_ids: tuple[int, ...] = ()) -> None:
        self.blocks, self.config = blocks, config or SchedulerConfig()
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.admitting = True     # False while draining: no new request starts
        self._arrivals = 0

    # ---- requests -------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a new or resumed sequence. One that already holds blocks (imported KV)
        joins the running set; otherwise it waits for (re-)prefill."""
        if seq.num_tokens >= self.config.max_model_len:
            raise SpotserveError(f"request {seq.request_id}: {seq.num_tokens} tokens reach "
                                 f"the context length {self.config.max_model_len}")
        if self.blocks.blocks_for(seq.num_tokens + 1) > self.blocks.num_blocks:
            raise SpotserveError(f"request {seq.request_id} cannot fit in the KV cache")
        self._arrivals += 1
        seq.arrival = self._arrivals
        if seq.block_table:
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        else:
            seq.num_computed, seq.status = 0, SequenceStatus.WAITING
            self.waiting.append(seq)

    def get(self, request_id: str) -> Sequence | None:
        return next((s for s in (*self.running, *self.waiting) if s.request_id == request_id),
                    None)

    def remove(self, request_id: str, reason: FinishReason = FinishReason.ABORT
               ) -> Sequence | None:
        """Take a sequence out (abort, or hand-over to another pipeline); frees its blocks."""
        seq = self.get(request_id)
        if seq is None:
            return None
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._finish(seq, reason)
        return seq

    @property
    def has_work(self) -> bool:
        return bool(self.running) or (self.admitting and bool(self.waiting))

    # ---- one step -------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_batched_tokens
        # oldest first: a preemption victim (the youngest) is never one already scheduled
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if seq not in self.running or budget == 0:
                continue
            num_new = min(seq.num_uncomputed, budget)
            if not self._make_room(seq, num_new, out):
                continue
            out.chunks.append(ScheduledChunk.of(seq, num_new))
            budget -= num_new
        if not out.preempted and self.admitting:
            self._admit(out, budget)
        return out

    def _make_room(self, seq: Sequence, num_new: int, out: SchedulerOutput) -> bool:
        """Grow `seq`'s blocks, preempting the youngest running sequences as needed.
        False when `seq` itself had to be preempted."""
        while not self.blocks.can_grow(seq, seq.num_computed + num_new):
            victim = max(self.running, key=lambda s: s.arrival)
            self._preempt(victim, out)
            if victim is seq:
                return False
        self.blocks.grow(seq, seq.num_computed + num_new)
        return True

    def set_aside(self, seq: Sequence) -> None:
        """Preempt `seq` by recompute to the back of the queue (its step could not run)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.num_computed, seq.status = 0, SequenceStatus.WAITING
        self.waiting.append(seq)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed, seq.status = 0, SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            num_new = min(seq.num_uncomputed, budget)
            # admit only if the whole sequence's next token fits, to avoid thrashing
            if not self.blocks.can_grow(seq, seq.num_tokens + 1):
                break
            self.waiting.popleft()
            self.blocks.grow(seq, seq.num_computed + num_new)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.chunks.append(ScheduledChunk.of(seq, num_new))
            budget -= num_new

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Sequence]:
        """Record a finished step: cache progress and the sampled tokens. Returns the
        sequences that finished."""
        finished = []
        for chunk in out.chunks:
            seq = chunk.seq
            seq.num_computed += chunk.num_new
            if not chunk.samples:
                continue
            seq.output_token_ids.append(sampled[seq.request_id])
            reason = self._stop_reason(seq)
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq, reason)
                finished.append(seq)
        return finished

    def _stop_reason(self, seq: Sequence) -> FinishReason | None:
        token, params = seq.output_token_ids[-1], seq.params
        if token in params.stop_token_ids:
            return FinishReason.STOP
        if token in self.eos_token_ids and not params.ignore_eos:
            return FinishReason.STOP
        if len(seq.output_token_ids) >= params.max_tokens:
            return FinishReason.LENGTH
        if seq.num_tokens >= self.config.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.blocks.free(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason
