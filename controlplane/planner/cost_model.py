"""The cost model interface and the one pipeline-latency formula both sources share.

A `CostModel` answers three questions: how long a stage of `layers` layers takes on a GPU
type at a TP degree for a micro-batch (prefill or one decode step), how long one pipeline
hop takes, and what fixed per-request overhead to add. `pipeline_times` turns those into
SpotServe's request latency (prefill t1, decode step t2, latency, throughput); with a
profile table and even stages it is exactly the formula of the SpotServe artifact:

    t1 = s1·(P+M1−1)/M1 + hop1·(P−1)/M1      (s1: slowest stage's prefill time)
    t2 = s2·(P+M2−1)   + hop2·(P−1)/M2      (s2: slowest stage's decode-step time)
    latency = (t1 + S_out·t2 + overhead(B))·fix_factor

Every pipeline slot lasts as long as the slowest stage, which is what makes the same
formula score uneven, heterogeneous pipelines.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol, runtime_checkable

from spotserve.catalog import GPUSpec


class Phase(Enum):
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True)
class Workload:
    """Request shape the cost is quoted for: prompt and generated tokens per request."""

    input_tokens: int = 512
    output_tokens: int = 128

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True)
class StageHardware:
    """Where one stage runs: `layers` layers on `tp` GPUs of `gpu`, its TP all-reduce over
    `tp_bytes_per_s`, and its activations to the next stage over `next_bytes_per_s`."""

    gpu: GPUSpec
    tp: int
    layers: int
    tp_bytes_per_s: float
    next_bytes_per_s: float
    last: bool = False


@runtime_checkable
class CostModel(Protocol):
    """A source of stage and hop times (milliseconds). Implementations are immutable."""

    @property
    def name(self) -> str:
        """Short label shown in plans (e.g. "profile", "roofline")."""
        ...

    @property
    def fix_factor(self) -> float:
        """Multiplier on the whole request latency (SpotServe's `final_fix_factor`)."""
        ...

    def supports(self, gpu: GPUSpec, tp: int) -> bool:
        """Whether this model can cost `tp`-way tensor parallelism on `gpu`."""
        ...

    def stage_ms(self, stage: StageHardware, micro_batch: int, phase: Phase,
                 workload: Workload) -> float:
        """One micro-batch through the stage: the whole prompt, or one decode step."""
        ...

    def hop_ms(self, stage: StageHardware, batch: int, phase: Phase,
               workload: Workload) -> float:
        """Sending the whole batch's activations from `stage` to the next stage."""
        ...

    def overhead_ms(self, batch: int) -> float:
        """Per-request fixed cost outside the layers (embedding lookup and final logits)."""
        ...


@dataclass(frozen=True)
class StepTimes:
    """Milliseconds: prefill of a batch, one decode step, the whole request; and req/s."""

    prefill_ms: float
    decode_step_ms: float
    latency_ms: float
    throughput: float


def pipeline_times(cost: CostModel, stages: Sequence[StageHardware], batch: int,
                   prefill_micro: int, decode_micro: int, workload: Workload,
                   replicas: int = 1) -> StepTimes:
    """SpotServe's latency model for one pipeline (and the throughput of `replicas` of it)."""
    groups = Counter(stages[:-1])
    return grouped_pipeline_times(cost, [*groups.items(), (stages[-1], 1)], batch,
                                  prefill_micro, decode_micro, workload, replicas)


def grouped_pipeline_times(cost: CostModel, groups: Sequence[tuple[StageHardware, int]],
                           batch: int, prefill_micro: int, decode_micro: int,
                           workload: Workload, replicas: int = 1) -> StepTimes:
    """`pipeline_times` for stages given as (stage, how many) in order; the last group's
    last stage is the pipeline's last stage (it sends nothing on)."""
    if batch % prefill_micro or batch % decode_micro:
        raise ValueError("micro-batch counts must divide the batch")
    p = sum(n for _, n in groups)
    s1 = max(cost.stage_ms(s, batch // prefill_micro, Phase.PREFILL, workload)
             for s, _ in groups)
    s2 = max(cost.stage_ms(s, batch // decode_micro, Phase.DECODE, workload) for s, _ in groups)
    last = groups[-1][0]
    hop1 = sum(n * cost.hop_ms(s, batch, Phase.PREFILL, workload) for s, n in groups) \
        - cost.hop_ms(last, batch, Phase.PREFILL, workload)
    hop2 = sum(n * cost.hop_ms(s, batch, Phase.DECODE, workload) for s, n in groups) \
        - cost.hop_ms(last, batch, Phase.DECODE, workload)
    return spotserve_times(p, s1, s2, hop1, hop2, batch, prefill_micro, decode_micro,
                           workload.output_tokens, cost.overhead_ms(batch), cost.fix_factor,
                           replicas)


def spotserve_times(stages: int, s1: float, s2: float, hop1: float, hop2: float, batch: int,
                    prefill_micro: int, decode_micro: int, output_tokens: int,
                    overhead_ms: float, fix_factor: float, replicas: int = 1) -> StepTimes:
    """The formula itself, from the slowest stage's prefill (`s1`) and decode-step (`s2`)
    times and the summed hop times: the one place it is written down."""
    t1 = s1 * (stages + prefill_micro - 1) / prefill_micro + hop1 / prefill_micro
    t2 = s2 * (stages + decode_micro - 1) + hop2 / decode_micro
    latency = (t1 + output_tokens * t2 + overhead_ms) * fix_factor
    return StepTimes(t1 * fix_factor, t2 * fix_factor, latency,
                     replicas * batch / latency * 1000.0)


def micro_batch_counts(batch: int) -> tuple[int, ...]:
    """Micro-batch counts SpotServe considers: powers of two dividing the batch."""
    return tuple(m for m in (1 << i for i in range(batch.bit_length())) if batch % m == 0)


def batch_sizes(max_batch: int) -> tuple[int, ...]:
    """Powers of two up to `max_batch` (and `max_batch` itself)."""
    sizes = {1 << i for i in range(max_batch.bit_length()) if 1 << i <= max_batch}
    return tuple(sorted(sizes | {max_batch}))
