"""Cost source 2: a roofline estimate for any `ModelSpec` on any catalog GPU.

Each op of a layer costs max(FLOPs / peak FLOP/s, bytes moved / HBM bandwidth): the QKV
projection, attention over the KV length, the output projection and the MLP, on one TP
rank's share; plus two ring all-reduces per layer over the stage's TP link. The last stage
adds the logits. A pipeline hop sends the batch's hidden states over the link to the next
stage. `compute_efficiency` and `bandwidth_efficiency` scale the vendor peaks to what
kernels reach in practice; the defaults (0.5, 0.8) are the values that fit SpotServe's
T4 profile tables best (mean error 9%, see tests/planner/test_cost_model.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

from spotserve.catalog import GPUSpec
from spotserve.model_spec import ModelSpec

from .cost_model import Phase, StageHardware, Workload


@dataclass(frozen=True)
class RooflineCostModel:
    model: ModelSpec
    compute_efficiency: float = 0.5
    bandwidth_efficiency: float = 0.8
    link_latency_s: float = 30e-6
    name: str = "roofline"
    fix_factor: float = 1.0

    def supports(self, gpu: GPUSpec, tp: int) -> bool:
        return self.model.supports_tp(tp)

    def stage_ms(self, stage: StageHardware, micro_batch: int, phase: Phase,
                 workload: Workload) -> float:
        return _stage_ms(self, stage, micro_batch, phase, workload)

    def _stage_ms(self, stage: StageHardware, micro_batch: int, phase: Phase,
                  workload: Workload) -> float:
        one_layer = replace(stage, layers=1, last=False, next_bytes_per_s=0.0)
        seconds = _layer_seconds(self, one_layer, micro_batch, phase, workload) * stage.layers
        if stage.last:
            seconds += self._logits_seconds(stage, micro_batch)
        return seconds * 1000.0

    def hop_ms(self, stage: StageHardware, batch: int, phase: Phase,
               workload: Workload) -> float:
        tokens = batch * (workload.input_tokens if phase is Phase.PREFILL else 1)
        size = tokens * self.model.hidden_size * self.model.dtype_bytes
        return (size / stage.next_bytes_per_s + self.link_latency_s) * 1000.0

    def overhead_ms(self, batch: int) -> float:
        return 0.0

    # ---- one layer ----------------------------------------------------------------------
    def layer_seconds(self, stage: StageHardware, micro_batch: int, phase: Phase,
                      workload: Workload) -> float:
        m, tp, b = self.model, stage.tp, self.model.dtype_bytes
        if phase is Phase.PREFILL:
            tokens, context = micro_batch * workload.input_tokens, workload.input_tokens / 2
            kv_read = 0.0
        else:
            tokens, context = micro_batch, workload.input_tokens + workload.output_tokens / 2
            kv_read = micro_batch * context * 2 * m.num_kv_heads * m.head_dim * b / tp
        q_out, kv_out = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
        mlp_mats = 2 if m.family == "opt" else 3
        time = self._matmul(stage, tokens, m.hidden_size, (q_out + 2 * kv_out) // tp)
        attn_flops = 4 * tokens * context * q_out / tp
        time += self._op(stage.gpu, attn_flops, kv_read + 3 * tokens * q_out * b / tp)
        time += self._matmul(stage, tokens, q_out // tp, m.hidden_size)
        time += mlp_mats * self._matmul(stage, tokens, m.hidden_size,
                                        m.intermediate_size // tp)
        return time + 2 * self._all_reduce(stage, tokens * m.hidden_size * b)

    def _matmul(self, stage: StageHardware, tokens: int, fan_in: int, fan_out: int) -> float:
        b = self.model.dtype_bytes
        moved = (fan_in * fan_out + tokens * (fan_in + fan_out)) * b
        return self._op(stage.gpu, 2.0 * tokens * fan_in * fan_out, moved)

    def _op(self, gpu: GPUSpec, flops: float, moved: float) -> float:
        peak = gpu.peak_flops(self.model.dtype) * self.compute_efficiency
        return max(flops / peak, moved / (gpu.hbm_bytes_per_s * self.bandwidth_efficiency))

    def _all_reduce(self, stage: StageHardware, size: float) -> float:
        if stage.tp == 1:
            return 0.0
        ring = 2 * (stage.tp - 1) / stage.tp * size / stage.tp_bytes_per_s
        return ring + 2 * (stage.tp - 1) * self.link_latency_s

    def _logits_seconds(self, stage: StageHardware, micro_batch: int) -> float:
        m = self.model
        return self._matmul(stage, micro_batch, m.hidden_size, m.vocab_size // stage.tp)


@lru_cache(maxsize=65536)
def _stage_ms(cost: RooflineCostModel, stage: StageHardware, micro_batch: int, phase: Phase,
              workload: Workload) -> float:
    return cost._stage_ms(stage, micro_batch, phase, workload)


@lru_cache(maxsize=65536)
def _layer_seconds(cost: RooflineCostModel, stage: StageHardware, micro_batch: int,
                   phase: Phase, workload: Workload) -> float:
    return cost.layer_seconds(stage, micro_batch, phase, workload)
