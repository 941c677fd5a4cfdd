"""Token identity across parallel configurations, migrations and resumes (fp32, gloo).

The reference is one process holding the whole model (P = M = 1). Tensor parallelism
changes the float summation order of the row-parallel reductions, so identity relies on
argmax margins: the tiny models use wide weights, and `test_reference_margins` checks that
every greedy choice wins by far more than fp32 reduction noise (~1e-6 here).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from spotserve.layout import ParallelConfig, PipelineLayout, Position, StageLayout
from spotserve.worker.engine.sequence import SamplingParams
from tests.engine.tiny_models import save_tiny
from tests.engine.world import ENGINE, Phase, merged, run_local, run_world

GREEDY = SamplingParams(max_tokens=14, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=10, temperature=0.8, top_k=40, top_p=0.9, seed=7,
                         ignore_eos=True)
ARRIVALS = (
    (0, "a", [5, 17, 99, 3, 42, 8, 61], GREEDY),
    (0, "b", [9, 4, 77], GREEDY),
    (1, "s", [12, 13, 14, 15], SAMPLED),
    (2, "c", [100, 20, 30, 40, 50, 60, 70, 80, 90, 99, 98, 97, 96, 95, 94, 93, 92, 91, 90, 1,
              2, 3, 4, 5, 6, 7, 8, 9, 10, 11], GREEDY),   # longer than the token budget
    (5, "d", [64], SamplingParams(max_tokens=9, ignore_eos=True)),
)


def _uniform(p: int, m: int) -> ParallelConfig:
    return ParallelConfig.uniform(4, 1, p, m)


HETERO = ParallelConfig((PipelineLayout((StageLayout(0, 1, 2), StageLayout(1, 4, 1))),))
UNEVEN3 = ParallelConfig((PipelineLayout((StageLayout(0, 2, 1), StageLayout(2, 3, 2),
                                          StageLayout(3, 4, 1))),))
MATRIX = {"P1M2": _uniform(1, 2), "P2M1": _uniform(2, 1), "P2M2": _uniform(2, 2),
          "P1M4": _uniform(1, 4), "hetero[0:1]x2+[1:4]x1": HETERO,
          "uneven[0:2]x1+[2:3]x2+[3:4]x1": UNEVEN3, "D2P1M2": ParallelConfig.uniform(4, 2, 1, 2)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama", "llama", seed=11)


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> dict[str, list[int]]:
    return run_local(checkpoint, [Phase(_uniform(1, 1), ARRIVALS)])[0]


def test_reference_margins(checkpoint: Path, reference: dict[str, list[int]]) -> None:
    """Every greedy token of the reference wins its argmax by a wide margin."""
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    for _, rid, prompt, params in ARRIVALS:
        assert len(reference[rid]) == params.max_tokens
        if not params.greedy:
            continue
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + reference[rid]])).logits[0, len(prompt) - 1:-1]
        top2 = logits.topk(2).values
        assert logits.argmax(-1).tolist() == reference[rid]
        assert float((top2[:, 0] - top2[:, 1]).min()) > 1e-3


@pytest.mark.slow
def test_token_identity_across_configurations(checkpoint: Path,
                                              reference: dict[str, list[int]]) -> None:
    """One world of 4 processes regrouped per epoch into each configuration in turn."""
    phases = [Phase(config, ARRIVALS) for config in MATRIX.values()]
    outputs = run_world(4, checkpoint, phases, timeout=240)
    for name, produced in zip(MATRIX, outputs, strict=True):
        assert produced == reference, name


@pytest.mark.slow
def test_drain_and_resume_from_the_drivers_whole_copy_across_configurations(
        checkpoint: Path, reference: dict[str, list[int]]) -> None:
    """Stop after k steps keeping each whole cache on the driver (what a worker does when
    a rank is leaving), give every rank of another configuration its ranges of it, resume;
    finally resume without KV by re-prefill. The tokens are those of the uninterrupted
    run."""
    phases = [
        # M=2, stop 3 steps after step 3 (request c is mid chunked prefill at step 3)
        Phase(_uniform(1, 2), ARRIVALS, drain_at=3, drain_steps=3),
        # M=2 → P=2 (M=1) on other processes, from the KV; stop again after 2 steps
        Phase(_uniform(2, 1), resume=True, drain_at=0, drain_steps=2,
              ranks={Position(0, 0, 0): 2, Position(0, 1, 0): 3}),
        # P=2 → M=4 (KV heads replicated), from the KV; stop, keep the tokens only
        Phase(_uniform(1, 4), resume=True, drain_at=0, drain_steps=2, export_kv=False),
        # re-prefill prompt + generated tokens on a heterogeneous pipeline, run to the end
        Phase(HETERO, resume=True),
    ]
    outputs = run_world(4, checkpoint, phases, timeout=240)
    assert merged(outputs) == reference
    assert set(outputs[1]) >= {"a", "b", "c", "s"}, "requests should have moved"


@pytest.mark.slow
def test_rank_to_rank_kv_handover(checkpoint: Path, reference: dict[str, list[int]]) -> None:
    """The migration path: every rank publishes its layers/heads of each request; the new
    ranks receive the pieces `kv_reshard_plan` assigns them; the driver adopts."""
    phases = [
        Phase(_uniform(2, 2), ARRIVALS, drain_at=3, drain_steps=2, handover="ranks"),
        Phase(UNEVEN3, resume=True, drain_at=0, drain_steps=3, handover="ranks"),
        Phase(_uniform(1, 4), resume=True),
    ]
    outputs = run_world(4, checkpoint, phases, timeout=240)
    assert merged(outputs) == reference
    assert len(outputs[1]["a"]) > len(outputs[0]["a"]) > 0


def test_local_drain_and_resume_by_kv_and_by_reprefill(checkpoint: Path,
                                                       reference: dict[str, list[int]]) -> None:
    for export_kv in (True, False):
        phases = [Phase(_uniform(1, 1), ARRIVALS, drain_at=4, drain_steps=2,
                        export_kv=export_kv),
                  Phase(_uniform(1, 1), resume=True)]
        assert merged(run_local(checkpoint, phases)) == reference


def test_fixed_shape_decode_steps_give_the_same_tokens(checkpoint: Path,
                                                       reference: dict[str, list[int]]) -> None:
    """The CUDA-graph decode step's arithmetic (batch padded to a power of two, blocks
    gathered up to one, padding written to a scratch block), run on the CPU without
    capture: the same tokens, in one process and as two pipeline stages, through mixed
    steps (the long prompt arrives while others decode) and seeded sampling."""
    graphs = replace(ENGINE, cuda_graphs=True)
    assert run_local(checkpoint, [Phase(_uniform(1, 1), ARRIVALS, engine=graphs)])[0] \
        == reference
    assert run_world(2, checkpoint, [Phase(_uniform(2, 1), ARRIVALS, engine=graphs)])[0] \
        == reference


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_smollm2_greedy_tokens_are_the_same_across_configurations(
        smollm2: tuple[Path, Path]) -> None:
    """A real model (SmolLM2-135M-Instruct: 30 layers, 9 heads, 3 KV heads) gives the same
    greedy tokens as one process in two pipeline stages and over three TP ranks (one KV
    head each; with M above the KV heads, `kv_heads` gives each rank a replica of one)."""
    from spotserve.tokenizer import ChatMessage, ModelTokenizer
    _, folder = smollm2
    tokenizer = ModelTokenizer.from_dir(folder)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    arrivals = tuple((step, f"q{i}", tokenizer.encode_chat([ChatMessage("user", question)]),
                      params)
                     for i, (step, question) in enumerate([
                         (0, "What is the capital of France?"),
                         (0, "Name three primary colors."),
                         (2, "Write a haiku about the sea.")]))
    reference = run_local(folder, [Phase(ParallelConfig.uniform(30, 1, 1, 1), arrivals)])[0]
    assert "Paris" in tokenizer.decode(reference["q0"])
    for pipeline, tensor in ((2, 1), (1, 3)):
        config = ParallelConfig.uniform(30, 1, pipeline, tensor)
        produced = run_world(pipeline * tensor, folder, [Phase(config, arrivals)],
                             timeout=400)[0]
        assert produced == reference, (pipeline, tensor)


@pytest.mark.slow
def test_gemma_tokens_are_the_same_across_configurations(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """Gemma's differences (the embedding scaled after the vocabulary-split lookup's
    all-reduce, (1 + weight) norms, GELU) hold under tensor and pipeline parallelism."""
    gemma = save_tiny(tmp_path_factory.mktemp("tiny") / "gemma", "gemma", seed=11)
    reference = run_local(gemma, [Phase(_uniform(1, 1), ARRIVALS)])[0]
    phases = [Phase(_uniform(1, 2), ARRIVALS), Phase(_uniform(2, 1), ARRIVALS)]
    for produced in run_world(2, gemma, phases, timeout=240):
        assert produced == reference
