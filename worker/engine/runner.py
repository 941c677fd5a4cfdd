"""Runs steps on one rank, and lets the driver drive the whole pipeline.

Every rank of a pipeline holds a `StageRunner` (its stage model, its KV cache, its epoch's
groups). The driver (stage 0, TP rank 0) calls `step`, `export_kv`, `import_kv`,
`publish_kv`, `adopt_kv` and `stop`; each broadcasts the command to the pipeline, then does
the driver's own share. The other ranks sit in `serve_forever`, doing their share of each
command as it arrives, until `stop`. A one-GPU pipeline skips all communication.

Two ways to move a request's KV cache between configurations:
- through the driver (`export_kv` / `import_kv`): the whole cache gathered into one tensor;
  simple, for tests and small models;
- rank to rank (`publish_kv` / `stage_kv` / `adopt_kv`): on drain every rank copies its own
  layers and heads of each request into `published` (what the transfer service serves, by
  layer/head/token range); on the new configuration the transfer service `stage_kv`s the
  pieces each rank needs (`spotserve.layout.kv_reshard_plan` says which), and the driver's
  `adopt_kv` has every rank write them into the request's new blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from spotserve.errors import SpotserveError
from spotserve.worker.engine.kv_cache import KVCache
from spotserve.worker.engine.plan import StepPlan
from spotserve.worker.engine.sampling import sample
from spotserve.worker.model.attention import AttentionBatch, SequenceChunk
from spotserve.worker.model.decoder import StageModel
from spotserve.worker.model.parallel import EpochGroups


@dataclass
class KVPiece:
    """Layers × heads × tokens of one request's KV cache: [layers, 2, tokens, heads, dim]."""

    layers: tuple[int, int]
    heads: tuple[int, int]
    tokens: tuple[int, int]
    data: torch.Tensor

    def cut(self, layers: tuple[int, int], heads: tuple[int, int]) -> KVPiece:
        """The sub-piece for the given (global) layer and head ranges."""
        (l0, _), (h0, _) = self.layers, self.heads
        data = self.data[layers[0] - l0:layers[1] - l0, :, :, heads[0] - h0:heads[1] - h0]
        return KVPiece(layers, heads, self.tokens, data.clone())


class StageRunner:
    def __init__(self, model: StageModel, cache: KVCache, groups: EpochGroups) -> None:
        self.model, self.cache, self.groups = model, cache, groups
        self.published: dict[str, KVPiece] = {}       # request → this rank's share, on drain
        self.staged: dict[str, list[KVPiece]] = {}    # request → pieces received for it

    def stage_kv(self, request_id: str, piece: KVPiece) -> None:
        """Hold a received piece until the driver adopts the request (this rank only)."""
        self.staged.setdefault(request_id, []).append(piece)

    # ---- driver side ----------------------------------------------------------------
    def step(self, plan: StepPlan) -> dict[str, int]:
        """Run one step on the whole pipeline; the sampled token of each sampling chunk."""
        return self._command("step", plan)  # type: ignore[no-any-return]

    def export_kv(self, block_table: tuple[int, ...], num_tokens: int) -> torch.Tensor:
        """The request's whole KV cache [layers, 2, tokens, kv_heads, head_dim], gathered
        from every rank of the pipeline."""
        return self._command("export", (block_table, num_tokens))  # type: ignore[no-any-return]

    def import_kv(self, block_table: tuple[int, ...], kv: torch.Tensor) -> None:
        """Store a request's whole KV cache; each rank keeps its layers and heads."""
        self._command("import", (block_table, kv))

    def publish_kv(self, requests: dict[str, tuple[tuple[int, ...], int]]) -> None:
        """Every rank copies its layers/heads of each request's first n tokens (request →
        (block table, n)) into `published`."""
        self._command("publish", requests)

    def adopt_kv(self, request_id: str, block_table: tuple[int, ...]) -> None:
        """Every rank writes its staged pieces of the request into `block_table`."""
        self._command("adopt", (request_id, block_table))

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
        if kind == "import":
            return self._import(*payload)
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
        batch = AttentionBatch.build(chunks, self.cache.block_size, model.device,
                                     model.sliding_window)
        if model.is_first:
            inputs = torch.tensor([t for c in plan.chunks for t in c.token_ids],
                                  device=model.device)
        else:
            inputs = groups.recv_forward((plan.num_tokens, model.spec.hidden_size),
                                         model.dtype, model.device)
        hidden = model(inputs, batch, self.cache.layers)
        tokens: dict[str, int] | None = None
        if not model.is_last:
            groups.send_forward(hidden)
        else:
            tokens = self._sample(plan, hidden)
        if groups.distributed:
            tokens = groups.broadcast_object(tokens, src=groups.sampler_rank)
        assert tokens is not None
        return tokens

    def _sample(self, plan: StepPlan, hidden: torch.Tensor) -> dict[str, int]:
        rows, params, positions, ids = [], [], [], []
        end = 0
        for c in plan.chunks:
            end += len(c.token_ids)
            if c.sample is not None:
                rows.append(end - 1)
                params.append(c.sample)
                positions.append(c.context_len)
                ids.append(c.request_id)
        if not rows:
            return {}
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=hidden.device)])
        if not self.groups.is_sampler:
            return {}
        return dict(zip(ids, sample(logits, params, positions), strict=True))

    def _export(self, block_table: tuple[int, ...], num_tokens: int) -> torch.Tensor | None:
        cache = self.cache
        layers = (cache.layer_range.start, cache.layer_range.stop)
        piece = cache.read(block_table, layers, cache.head_range, (0, num_tokens)).cpu()
        pieces = self.groups.gather_objects((layers, cache.head_range, piece))
        if pieces is None:
            return None
        return _assemble(pieces)

    def _import(self, block_table: tuple[int, ...], kv: torch.Tensor) -> None:
        cache = self.cache
        (l0, l1), (h0, h1) = (cache.layer_range.start, cache.layer_range.stop), cache.head_range
        cache.write(block_table, (l0, l1), (h0, h1), (0, kv.shape[2]), kv[l0:l1, :, :, h0:h1])


    def _own_ranges(self) -> tuple[tuple[int, int], tuple[int, int]]:
        return (self.cache.layer_range.start, self.cache.layer_range.stop), self.cache.head_range

    def _publish(self, requests: dict[str, tuple[tuple[int, ...], int]]) -> None:
        layers, heads = self._own_ranges()
        for request_id, (table, num_tokens) in requests.items():
            data = self.cache.read(table, layers, heads, (0, num_tokens)).cpu()
            self.published[request_id] = KVPiece(layers, heads, (0, num_tokens), data)

    def _adopt(self, request_id: str, block_table: tuple[int, ...]) -> None:
        pieces = self.staged.pop(request_id, [])
        layers, heads = self._own_ranges()
        covered = sum((p.layers[1] - p.layers[0]) * (p.heads[1] - p.heads[0]) for p in pieces)
        if covered != (layers[1] - layers[0]) * (heads[1] - heads[0]):
            raise SpotserveError(f"request {request_id}: staged KV pieces do not cover "
                                 f"layers {layers} x heads {heads} exactly")
        for p in pieces:
            self.cache.write(block_table, p.layers, p.heads, p.tokens, p.data)


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
