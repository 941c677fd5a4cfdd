"""The engine a pipeline driver runs: requests in, tokens out, state out and in for recovery.

Single-threaded; the worker service wraps it (its own lock or loop). Contract:
- `submit` queues a request; it joins the batch at the next `step` that has room.
- `step` runs one forward of the pipeline and returns the tokens it produced.
- `drain(k)` lets exactly k more steps run (no new request starts); then `step` does
  nothing and every unfinished request keeps its KV cache for `publish`.
- `publish()` takes requests out: every rank keeps its own share of each one's KV cache
  (the runner's shares, which the transfer service serves); the returned states carry the
  tokens and how many of them the cache covers. `adopt(state)` continues a request from
  the shares its new ranks hold (its own old ones, or pieces pulled from old ranks), or by
  re-prefilling prompt + generated tokens when some rank lacks its share; `resume(state)`
  continues one by re-prefill.
Either way the request's next tokens are the ones it would have produced uninterrupted.

Out of device memory in a step (a one-process stage): the step is dropped (no sequence
advanced; what it wrote to the cache is rewritten when the tokens run again) and the
request with the most tokens in it steps aside, recomputed later from the back of the
queue; if it runs out of memory a second time it is rejected with an event saying so,
and everything else goes on. On a stage of several ranks a rank may be inside a
collective when it fails, so the error breaks the pipeline as any rank's fault does and
its requests resume on others.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch

from spotserve.errors import SpotserveError
from spotserve.worker.engine.block_manager import BlockManager
from spotserve.worker.engine.kv_shares import KVPiece
from spotserve.worker.engine.plan import StepPlan
from spotserve.worker.engine.runner import StageRunner
from spotserve.worker.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from spotserve.worker.engine.sequence import (
    FinishReason,
    RequestState,
    SamplingParams,
    Sequence,
)


@dataclass(frozen=True)
class TokenEvent:
    """A token produced for a request; `finish_reason` is set on its last one."""

    request_id: str
    token_id: int | None             # None on a rejection
    index: int                       # 0 for the first generated token
    finish_reason: FinishReason | None = None
    error: str = ""                  # set: the engine rejected the request (why), no token


def free_device_memory() -> None:
    """After an out-of-memory error: drop what the failed work held, and hand the
    allocator's cached blocks back to the device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def first_line(exc: BaseException, width: int = 200) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:width]


@dataclass(frozen=True)
class EngineConfig:
    num_blocks: int = 512
    block_size: int = 16
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    cuda_graphs: bool = False    # replay decode steps from CUDA graphs (`engine.graphs`)


class Engine:
    def __init__(self, runner: StageRunner, config: EngineConfig | None = None) -> None:
        self.runner, self.config = runner, config or EngineConfig()
        if runner.cache.num_blocks < self.config.num_blocks or \
                runner.cache.block_size != self.config.block_size:
            raise SpotserveError("the KV cache is smaller than the engine's block budget")
        spec = runner.model.spec
        limits = self.config.scheduler
        if limits.max_model_len > spec.max_position:   # never past the model's context
            limits = replace(limits, max_model_len=spec.max_position)
        self.blocks = BlockManager(self.config.num_blocks, self.config.block_size)
        self.scheduler = Scheduler(self.blocks, limits, spec.eos_token_ids)
        self.steps_left: int | None = None   # set by drain
        self.num_steps = 0
        self.out_of_memory: set[str] = set()   # requests already set aside once for it

    # ---- requests -------------------------------------------------------------------
    def submit(self, request_id: str, prompt_token_ids: Iterable[int],
               params: SamplingParams | None = None) -> None:
        if self.scheduler.get(request_id) is not None:
            raise SpotserveError(f"request {request_id} is already in this engine")
        seq = Sequence(request_id, list(prompt_token_ids), params or SamplingParams())
        vocab = self.runner.model.spec.vocab_size
        if any(not 0 <= t < vocab for t in seq.prompt_token_ids):
            raise SpotserveError(f"request {request_id}: token id outside [0, {vocab})")
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        self.out_of_memory.discard(request_id)
        return self.scheduler.remove(request_id) is not None

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work

    def request_ids(self) -> list[str]:
        return [s.request_id for s in (*self.scheduler.running, *self.scheduler.waiting)]

    # ---- stepping -------------------------------------------------------------------
    def step(self) -> list[TokenEvent]:
        if self.steps_left == 0:
            return []
        out = self.scheduler.schedule()
        if out.empty:
            return []
        failed = ""
        try:
            sampled = self.runner.step(StepPlan.of(out))
        except torch.OutOfMemoryError as exc:
            if self.runner.groups.distributed:
                raise
            failed = first_line(exc)
        if failed:   # out of the except block: the failed step's frames are let go
            return self._out_of_memory(out, failed)
        finished = {s.request_id for s in self.scheduler.update(out, sampled)}
        if self.out_of_memory:
            self.out_of_memory -= finished
        self.num_steps += 1
        if self.steps_left is not None:
            self.steps_left -= 1
        events = []
        for chunk in out.chunks:
            seq = chunk.seq
            if chunk.samples:
                reason = seq.finish_reason if seq.request_id in finished else None
                events.append(TokenEvent(seq.request_id, seq.output_token_ids[-1],
                                         len(seq.output_token_ids) - 1, reason))
        return events

    def _out_of_memory(self, out: SchedulerOutput, error: str) -> list[TokenEvent]:
        """The step did not fit in device memory: the biggest request in it steps aside
        (to be recomputed after the queue), or, the second time, is rejected."""
        free_device_memory()
        chunk = max(out.chunks, key=lambda c: (c.num_new, c.seq.num_tokens, c.seq.arrival))
        seq = chunk.seq
        if seq.request_id not in self.out_of_memory:
            self.out_of_memory.add(seq.request_id)
            self.scheduler.set_aside(seq)
            return []
        self.out_of_memory.discard(seq.request_id)
        self.scheduler.remove(seq.request_id)
        why = (f"out of memory: request {seq.request_id} ({seq.num_tokens} tokens, "
               f"{chunk.num_new} of them in the failing step) does not fit in this "
               f"worker's device memory next to the requests it serves ({error})")
        return [TokenEvent(seq.request_id, None, len(seq.output_token_ids),
                           FinishReason.ABORT, why)]

    def drain(self, steps: int) -> None:
        """Allow exactly `steps` more steps, starting no new request; then stop."""
        if steps < 0:
            raise SpotserveError("drain needs a non-negative number of steps")
        self.steps_left = steps
        self.scheduler.admitting = False

    def undrain(self) -> None:
        self.steps_left, self.scheduler.admitting = None, True

    def run(self, max_steps: int | None = None) -> list[TokenEvent]:
        """Step until nothing is left to do (or `max_steps`); all events, in order."""
        events: list[TokenEvent] = []
        while self.has_unfinished and self.steps_left != 0:
            if max_steps is not None and self.num_steps >= max_steps:
                break
            events.extend(self.step())
        return events

    # ---- recovery -------------------------------------------------------------------
    def publish(self, request_ids: list[str] | None = None, gather: bool = False
                ) -> list[RequestState]:
        """Hand requests over rank to rank: every rank keeps its share of each request's KV
        in its shares; with `gather`, the driver also keeps each whole cache (the fallback
        when a rank is leaving). The returned states carry tokens and `num_computed` (no
        tensor). The requests leave this engine."""
        seqs = [s for s in (self.scheduler.get(r) for r in request_ids or self.request_ids())
                if s is not None]
        cached = [s for s in seqs if s.num_computed > 0]
        whole = {s.request_id: self.runner.export_kv(tuple(s.block_table), s.num_computed)
                 for s in cached} if gather else {}
        self.runner.publish_kv({s.request_id: (tuple(s.block_table), s.num_computed)
                                for s in cached})
        spec = self.runner.model.spec
        for request_id, kv in whole.items():
            self.runner.shares.put(request_id, KVPiece(
                (0, spec.num_layers), (0, spec.num_kv_heads), (0, kv.shape[2]), kv))
        states = []
        for seq in seqs:
            state = RequestState.of(seq)
            state.num_computed = seq.num_computed
            states.append(state)
            self.scheduler.remove(seq.request_id)
            self.out_of_memory.discard(seq.request_id)
        return states

    def adopt(self, state: RequestState) -> bool:
        """Continue a published request from the shares of this pipeline's ranks (its
        first `state.num_computed` tokens). True if they all held theirs; False when the
        request re-prefills instead (a rank lacks its share, or the cache has no room for
        it now: a pipeline that adopted another's requests may hold more than it fits)."""
        seq = Sequence(state.request_id, list(state.prompt_token_ids), state.params,
                       output_token_ids=list(state.output_token_ids))
        if state.num_computed == 0 or not self.blocks.can_grow(seq, state.num_computed):
            self.scheduler.add(seq)
            return False
        self.blocks.grow(seq, state.num_computed)
        try:
            adopted = self.runner.adopt_kv(state.request_id, tuple(seq.block_table),
                                           state.num_computed)
        except Exception:
            self.blocks.free(seq)
            raise
        if adopted:
            seq.num_computed = state.num_computed
        else:   # some rank lacks its share: recompute prompt + generated tokens
            self.blocks.free(seq)
        self.scheduler.add(seq)
        return adopted

    def resume(self, state: RequestState) -> None:
        """Continue a request exported elsewhere by re-prefilling prompt + generated."""
        self.scheduler.add(Sequence(state.request_id, list(state.prompt_token_ids),
                                    state.params, output_token_ids=list(state.output_token_ids)))

    def keepalive(self) -> None:
        """Check every rank of an idle pipeline is there (raises when one is not)."""
        self.runner.ping()

    def shutdown(self) -> None:
        """Release the pipeline's other ranks."""
        self.runner.stop()
