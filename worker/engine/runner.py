"""Runs steps on one rank, and lets the driver drive the whole pipeline.

Every rank of a pipeline holds a `StageRunner` (its stage model, its KV cache, its epoch's
groups, and the worker's `KVShares`). The driver (stage 0, TP rank 0) calls `step`,
`publish_kv`, `adopt_kv`, `export_kv`, `ping` and `stop`; each broadcasts the command to
the pipeline, then does the driver's own share. The other ranks sit in `serve_forever`,
doing their share of each command as it arrives, until `stop`. A one-GPU pipeline skips
all communication.

A request's KV cache moves rank to rank: on drain every rank copies its own layers and
heads of each request into the shares (`publish_kv`), which the transfer service serves by
layer/head/token range; a new rank receives the pieces the migration plan assigns it
(`spotserve.layout.kv_reshard_plan`) into its own shares, and the driver's `adopt_kv` has
every rank write its ranges into the request's new blocks, or report that it lacks some
(the request then re-prefills). `export_kv` gathers a request's whole cache on the driver:
the fallback copy when a rank is known to be leaving.
"""

from __future__ import annotations

from typing import Any

import torch

from spotserve.worker.engine.graphs import DecodeGraphs
from spotserve.worker.engine.kv_cache import KVCache
from spotserve.worker.engine.kv_shares import KVPiece, KVShares
from spotserve.worker.engine.plan import StepPlan
from spotserve.worker.engine.sampling import sample
from spotserve.worker.model.attention import AttentionBatch, SequenceChunk
from spotserve.worker.model.decoder import StageModel
from spotserve.worker.model.parallel import EpochGroups

__all__ = ["KVPiece", "StageRunner"]


class StageRunner:
    def __init__(self, model: StageModel, cache: KVCache, groups: EpochGroups,
                 shares: KVShares | None = None, graphs: DecodeGraphs | None = None) -> None:
        self.model, self.cache, self.groups = model, cache, groups
        self.shares = shares if shares is not None else KVShares()
        self.graphs = graphs

    # ---- driver side ----------------------------------------------------------------
    def step(self, plan: StepPlan) -> dict[str, int]:
        """Run one step on the whole pipeline; the sampled token of each sampling chunk."""
        return self._command("step", plan)  # type: ignore[no-any-return]

    def export_kv(self, block_table: tuple[int, ...], num_tokens: int) -> torch.Tensor:
        """The request's whole KV cache [layers, 2, tokens, kv_heads, head_dim], gathered
        from every rank of the pipeline."""
        return self._command("export", (block_table, num_tokens))  # type: ignore[no-any-return]

    def publish_kv(self, requests: dict[str, tuple[tuple[int, ...], int]]) -> None:
        """Every rank copies its layers/heads of each request's first n tokens (request →
        (block table, n)) into its shares."""
        self._command("publish", requests)

    def adopt_kv(self, request_id: str, block_table: tuple[int, ...], num_tokens: int
                 ) -> bool:
        """Every rank writes its ranges of the request's first `num_tokens` tokens from its
        shares into `block_table`; False when some rank does not hold all of them."""
        return bool(self._command("adopt", (request_id, block_table, num_tokens)))

    def stop(self) -> None:
        """Release the other ranks from `serve_forever`."""
        self._command("stop", None)

    def ping(self) -> None:
        """A round trip with every rank: keeps an idle pipeline's collectives inside their
        timeout and finds a dead or stalled peer (raises) before a request does."""
        if self.groups.distributed:
            self._command("ping", None)

    def _command(self, kind: str, payload: Any) -> Any:
        if self.groups.distributed:
            self.groups.broadcast_object((kind, payload), src=self.groups.driver_rank)
        return self._handle(kind, payload)

    # ---- every rank -----------------------------------------------------------------
    def serve_forever(self) -> None:
        """Follower loop: do this rank's share of each command until `stop`."""
        while True:
            kind, payload = self.groups.broadcast_object(None, src=self.groups.driver_rank)
            self._handle(kind, payload)
            if kind == "stop":
                return

    def _handle(self, kind: str, payload: Any) -> Any:
        if kind == "step":
            return self._step(payload)
        if kind == "export":
            return self._export(*payload)
        if kind == "publish":
            return self._publish(payload)
        if kind == "adopt":
            return self._adopt(*payload)
        if kind == "ping":
            self.groups.barrier()
        return None

    @torch.inference_mode()
    def _step(self, plan: StepPlan) -> dict[str, int]:
        model, groups = self.model, self.groups
        chunks = [SequenceChunk(len(c.token_ids), c.context_len, c.block_table)
                  for c in plan.chunks]
        ids = [t for c in plan.chunks for t in c.token_ids] if model.is_first else None
        received = None
        if not model.is_first:
            received = groups.recv_forward((plan.num_tokens, model.spec.hidden_size),
                                           model.dtype, model.device)
        out = None if self.graphs is None else self.graphs.run(chunks, ids, received)
        tokens: dict[str, int] | None = None
        if out is not None:   # replayed: hidden states, or the last stage's logits
            if not model.is_last:
                groups.send_forward(out)
            else:
                rows = [i for i, c in enumerate(plan.chunks) if c.sample is not None]
                tokens = self._sample_logits(plan, out if len(rows) == len(plan.chunks)
                                             else out[rows])
        else:
            batch = AttentionBatch.build(
                chunks, self.cache.block_size, model.device, model.sliding_window,
                token_ids=ids, sample_rows=_sample_rows(plan) if model.is_last else None)
            inputs = batch.token_ids if model.is_first else received
            assert inputs is not None
            hidden = model(inputs, batch, self.cache.layers)
            if not model.is_last:
                groups.send_forward(hidden)
            elif batch.sample_rows is not None and len(batch.sample_rows):
                logits = model.compute_logits(hidden.index_select(0, batch.sample_rows))
                tokens = self._sample_logits(plan, logits)
            else:
                tokens = {}
        if groups.distributed:
            tokens = groups.broadcast_object(tokens, src=groups.sampler_rank)
        assert tokens is not None
        return tokens

    def _sample_logits(self, plan: StepPlan, logits: torch.Tensor) -> dict[str, int]:
        """The tokens of the sampling chunks, from their logits (one row each, in order)."""
        if not self.groups.is_sampler:
            return {}
        sampled = [c for c in plan.chunks if c.sample is not None]
        params = [c.sample for c in sampled if c.sample is not None]
        tokens = sample(logits, params, [c.context_len for c in sampled])
        return dict(zip([c.request_id for c in sampled], tokens, strict=True))

    def _export(self, block_table: tuple[int, ...], num_tokens: int) -> torch.Tensor | None:
        cache = self.cache
        layers = (cache.layer_range.start, cache.layer_range.stop)
        piece = cache.read(block_table, layers, cache.head_range, (0, num_tokens)).cpu()
        pieces = self.groups.gather_objects((layers, cache.head_range, piece))
        if pieces is None:
            return None
        return _assemble(pieces)

    def _own_ranges(self) -> tuple[tuple[int, int], tuple[int, int]]:
        return (self.cache.layer_range.start, self.cache.layer_range.stop), self.cache.head_range

    def _publish(self, requests: dict[str, tuple[tuple[int, ...], int]]) -> None:
        layers, heads = self._own_ranges()
        for request_id, (table, num_tokens) in requests.items():
            data = self.cache.read(table, layers, heads, (0, num_tokens)).cpu()
            self.shares.replace(request_id, [KVPiece(layers, heads, (0, num_tokens), data)])

    def _adopt(self, request_id: str, block_table: tuple[int, ...], num_tokens: int) -> bool:
        """Write this rank's share; every rank's answer reaches the driver, which adopts
        only if all of them had theirs (a rank missing some writes nothing that matters:
        the blocks are freed and the request re-prefills)."""
        layers, heads = self._own_ranges()
        data = self.shares.assemble(request_id, layers, heads, num_tokens)
        if data is not None:
            self.cache.write(block_table, layers, heads, (0, num_tokens),
                             data.to(self.model.device))
        answers = self.groups.gather_objects(data is not None)
        return answers is not None and all(answers)


def _sample_rows(plan: StepPlan) -> list[int]:
    """The row of the step's output behind each sampling chunk: its last token."""
    rows, end = [], 0
    for c in plan.chunks:
        end += len(c.token_ids)
        if c.sample is not None:
            rows.append(end - 1)
    return rows


def _assemble(pieces: list[Any]) -> torch.Tensor:
    """Stitch per-rank (layers, heads, tensor) pieces into one full-request KV tensor."""
    num_layers = max(l1 for (_, l1), _, _ in pieces)
    num_heads = max(h1 for _, (_, h1), _ in pieces)
    sample_piece = pieces[0][2]
    _, two, tokens, _, head_dim = sample_piece.shape
    out = torch.zeros(num_layers, two, tokens, num_heads, head_dim, dtype=sample_piece.dtype)
    for (l0, l1), (h0, h1), piece in pieces:
        out[l0:l1, :, :, h0:h1] = piece
    return out
