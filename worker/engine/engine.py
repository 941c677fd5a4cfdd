"""The engine a pipeline driver runs: requests in, tokens out, state out and in for recovery.

Single-threaded; the worker service wraps it (its own lock or loop). Contract:
- `submit` queues a request; it joins the batch at the next `step` that has room.
- `step` runs one forward of the pipeline and returns the tokens it produced.
- `drain(k)` lets exactly k more steps run (no new request starts); then `step` does
  nothing and every unfinished request keeps its KV cache for `export`.
- `export(request_id)` returns the request's `RequestState` (tokens and, unless asked not
  to, its KV cache gathered on the driver) and removes it; `resume(state)` continues it
  here: from the imported KV cache when the state carries one, else by re-prefilling
  prompt + generated tokens.
- `publish()` / `adopt(state)` do the same rank to rank: each rank keeps its own share of
  the KV cache for the transfer service, and the new ranks write what they were sent.
Either way the request's next tokens are the ones it would have produced uninterrupted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from spotserve.errors import SpotserveError
from spotserve.worker.engine.block_manager import BlockManager
from spotserve.worker.engine.plan import StepPlan
from spotserve.worker.engine.runner import StageRunner
from spotserve.worker.engine.scheduler import Scheduler, SchedulerConfig
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
    token_id: int
    index: int                       # 0 for the first generated token
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class EngineConfig:
    num_blocks: int = 512
    block_size: int = 16
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)


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
        sampled = self.runner.step(StepPlan.of(out))
        finished = {s.request_id for s in self.scheduler.update(out, sampled)}
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
    def export(self, request_id: str, with_kv: bool = True) -> RequestState:
        """Take a request out of this engine, with its KV cache when it has one."""
        seq = self.scheduler.get(request_id)
        if seq is None:
            raise SpotserveError(f"no request {request_id} here")
        kv = None
        if with_kv and seq.num_computed > 0:
            kv = self.runner.export_kv(tuple(seq.block_table), seq.num_computed)
        state = RequestState.of(seq, kv)
        self.scheduler.remove(request_id)
        return state

    def export_all(self, with_kv: bool = True) -> list[RequestState]:
        return [self.export(r, with_kv) for r in self.request_ids()]

    def publish(self, request_ids: list[str] | None = None) -> list[RequestState]:
        """Hand requests over rank to rank: every rank keeps its share of each request's KV
        in `runner.published`; the returned states carry tokens and `num_computed` (no
        tensor). The requests leave this engine."""
        seqs = [s for s in (self.scheduler.get(r) for r in request_ids or self.request_ids())
                if s is not None]
        self.runner.publish_kv({s.request_id: (tuple(s.block_table), s.num_computed)
                                for s in seqs if s.num_computed > 0})
        states = []
        for seq in seqs:
            state = RequestState.of(seq)
            state.num_computed = seq.num_computed
            states.append(state)
            self.scheduler.remove(seq.request_id)
        return states

    def adopt(self, state: RequestState) -> None:
        """Continue a published request whose KV pieces every rank has staged
        (`runner.stage_kv`); with nothing cached, this is a re-prefill."""
        seq = Sequence(state.request_id, list(state.prompt_token_ids), state.params,
                       output_token_ids=list(state.output_token_ids))
        if state.num_computed == 0:
            self.scheduler.add(seq)
            return
        self.blocks.grow(seq, state.num_computed)
        try:
            self.runner.adopt_kv(state.request_id, tuple(seq.block_table))
        except Exception:
            self.blocks.free(seq)
            raise
        seq.num_computed = state.num_computed
        self.scheduler.add(seq)

    def resume(self, state: RequestState) -> None:
        """Continue a request exported elsewhere (KV import, or re-prefill without KV)."""
        seq = Sequence(state.request_id, list(state.prompt_token_ids), state.params,
                       output_token_ids=list(state.output_token_ids))
        if state.kv is None or state.num_computed == 0:
            self.scheduler.add(seq)
            return
        if state.kv.shape[2] != state.num_computed:
            raise SpotserveError(f"request {state.request_id}: KV holds {state.kv.shape[2]} "
                                 f"tokens, state says {state.num_computed}")
        self.blocks.grow(seq, state.num_computed)
        try:
            self.runner.import_kv(tuple(seq.block_table), state.kv)
        except Exception:
            self.blocks.free(seq)
            raise
        seq.num_computed = state.num_computed
        self.scheduler.add(seq)

    def keepalive(self) -> None:
        """Check every rank of an idle pipeline is there (raises when one is not)."""
        self.runner.ping()

    def shutdown(self) -> None:
        """Release the pipeline's other ranks."""
        self.runner.stop()
