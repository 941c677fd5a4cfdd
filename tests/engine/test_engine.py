"""The driver engine in one process: generation equals `transformers.generate`, and the
answer does not depend on batching, preemption, or where sampling resumes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spotserve.errors import SpotserveError
from spotserve.worker.engine.builder import local_engine
from spotserve.worker.engine.engine import Engine, EngineConfig
from spotserve.worker.engine.sampling import filter_logits, position_key, sample_one
from spotserve.worker.engine.scheduler import SchedulerConfig
from spotserve.worker.engine.sequence import FinishReason, SamplingParams, Sequence
from tests.engine.tiny_models import save_tiny

PROMPTS = {"a": [5, 17, 99, 3, 42, 8, 61], "b": [9, 4, 77], "c": list(range(20, 50))}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny") / "qwen3", "qwen3", seed=2)


def _engine(folder: Path, blocks: int = 64, budget: int = 16, **kw: object) -> Engine:
    config = EngineConfig(num_blocks=blocks, block_size=4,
                          scheduler=SchedulerConfig(max_batched_tokens=budget))
    return local_engine(folder, config, **kw)  # type: ignore[arg-type]


def _generate(engine: Engine, params: dict[str, SamplingParams]) -> dict[str, list[int]]:
    for rid, p in params.items():
        engine.submit(rid, PROMPTS[rid], p)
    out: dict[str, list[int]] = {rid: [] for rid in params}
    for event in engine.run():
        out[event.request_id].append(event.token_id)
    return out


def test_greedy_equals_transformers_generate(checkpoint: Path) -> None:
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    hf.generation_config.eos_token_id = None   # like ignore_eos
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    got = _generate(_engine(checkpoint), dict.fromkeys(PROMPTS, params))
    for rid, prompt in PROMPTS.items():
        ids = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
        assert got[rid] == ids[0, len(prompt):].tolist(), rid


def test_preemption_by_recompute_keeps_tokens(checkpoint: Path) -> None:
    params = dict.fromkeys(PROMPTS, SamplingParams(max_tokens=16, ignore_eos=True))
    roomy = _generate(_engine(checkpoint), params)
    engine = _engine(checkpoint, blocks=16, budget=40)
    preempted = []
    for rid, p in params.items():
        engine.submit(rid, PROMPTS[rid], p)
    out: dict[str, list[int]] = {rid: [] for rid in params}
    while engine.has_unfinished:
        before = {s.request_id for s in engine.scheduler.running}
        for event in engine.step():
            out[event.request_id].append(event.token_id)
        preempted += [r for r in before if r in {s.request_id for s in engine.scheduler.waiting}]
    assert preempted, "the tiny cache should have forced a preemption"
    assert out == roomy



def test_tokens_do_not_depend_on_who_joins_leaves_or_is_preempted(checkpoint: Path) -> None:
    """Arrivals mid-decode, early finishes (leaving free blocks inside the span decode
    attention reads) and preemptions reshape the batch step after step; each request still
    produces the tokens it produces alone."""
    prompts = {**PROMPTS, "d": [7, 7, 3, 120, 64], "e": list(range(60, 81))}
    params = {rid: SamplingParams(max_tokens=n, ignore_eos=True)
              for rid, n in {"a": 18, "b": 4, "c": 14, "d": 10}.items()}
    params["e"] = SamplingParams(max_tokens=12, temperature=0.9, top_k=30, seed=5,
                                 ignore_eos=True)
    arrivals = {0: ["a", "b"], 2: ["c"], 5: ["d"], 6: ["e"]}
    alone = {}
    for rid, p in params.items():
        engine = _engine(checkpoint)
        engine.submit(rid, prompts[rid], p)
        alone[rid] = [e.token_id for e in engine.run()]
    engine = _engine(checkpoint, blocks=20, budget=12)
    out: dict[str, list[int]] = {rid: [] for rid in params}
    preempted, step = set(), 0
    while step in arrivals or engine.has_unfinished:
        for rid in arrivals.get(step, []):
            engine.submit(rid, prompts[rid], params[rid])
        running = {s.request_id for s in engine.scheduler.running}
        for event in engine.step():
            out[event.request_id].append(event.token_id)
        preempted |= running & {s.request_id for s in engine.scheduler.waiting}
        step += 1
    assert preempted, "the small cache should have forced a preemption"
    assert out == alone

def test_sampling_is_independent_of_batch_and_seeded(checkpoint: Path) -> None:
    sampled = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.95, seed=3,
                             ignore_eos=True)
    alone = _generate(_engine(checkpoint), {"a": sampled})["a"]
    greedy = SamplingParams(max_tokens=10, ignore_eos=True)
    batched = _generate(_engine(checkpoint), {"b": greedy, "a": sampled, "c": greedy})["a"]
    assert alone == batched
    other = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.95, seed=4, ignore_eos=True)
    assert _generate(_engine(checkpoint), {"a": other})["a"] != alone


def test_sampling_filters() -> None:
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    top2 = filter_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.isinf(top2[2:]).all() and not torch.isinf(top2[:2]).any()
    probs = logits.softmax(-1)   # ≈ .64 .23 .09 .03 .01
    nucleus = filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.8))
    assert (~torch.isinf(nucleus)).tolist() == [True, True, False, False, False]
    assert probs[0] < 0.8 < probs[0] + probs[1]
    one = SamplingParams(temperature=0.7, top_k=1, seed=1)
    assert all(sample_one(logits, one, pos) == 0 for pos in range(20))
    hot = SamplingParams(temperature=5.0, seed=1)
    assert len({sample_one(logits, hot, pos) for pos in range(50)}) > 2
    assert position_key(1, 2) != position_key(2, 1)


def test_stop_tokens_eos_and_limits(checkpoint: Path) -> None:
    free = _generate(_engine(checkpoint), {"a": SamplingParams(max_tokens=8, ignore_eos=True)})
    stop_at = free["a"][3]
    engine = _engine(checkpoint)
    engine.submit("a", PROMPTS["a"], SamplingParams(max_tokens=8, stop_token_ids=(stop_at,)))
    events = engine.run()
    cut = free["a"].index(stop_at)
    assert [e.token_id for e in events] == free["a"][:cut + 1]
    assert events[-1].finish_reason is FinishReason.STOP
    with pytest.raises(SpotserveError, match="outside"):
        engine.submit("x", [10_000], SamplingParams())
    with pytest.raises(SpotserveError, match="empty prompt"):
        engine.submit("y", [], SamplingParams())


def test_bf16_runs(checkpoint: Path) -> None:
    engine = _engine(checkpoint, dtype="bfloat16")
    assert engine.runner.model.dtype is torch.bfloat16
    out = _generate(engine, {"a": SamplingParams(max_tokens=6, ignore_eos=True)})
    assert len(out["a"]) == 6


def test_drain_stops_after_exactly_k_steps(checkpoint: Path) -> None:
    engine = _engine(checkpoint)
    engine.submit("a", PROMPTS["a"], SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.drain(3)
    engine.submit("b", PROMPTS["b"], SamplingParams())
    assert len(engine.run()) == 3 and engine.step() == []
    a, b = engine.publish()
    assert len(a.output_token_ids) == 4 and a.num_computed == 10
    assert engine.runner.shares.tokens("a") == 10
    assert b.num_computed == 0 and engine.runner.shares.tokens("b") == 0   # never started


def test_a_request_adopted_into_a_full_cache_re_prefills_with_the_same_tokens(
        checkpoint: Path) -> None:
    """A pipeline that adopts another's requests may hold more than its cache fits: the
    one that finds no room re-prefills (adopt says False) instead of failing."""
    params = {"c": SamplingParams(max_tokens=6, ignore_eos=True),
              **dict.fromkeys("ab", SamplingParams(max_tokens=16, ignore_eos=True))}
    roomy = _generate(_engine(checkpoint), params)
    engine = _engine(checkpoint, blocks=10, budget=40)
    engine.submit("c", PROMPTS["c"], params["c"])
    out: dict[str, list[int]] = {rid: [] for rid in params}
    events = engine.step()
    engine.drain(1)
    for event in events + engine.run():
        out[event.request_id].append(event.token_id)
    (paused,) = engine.publish()
    engine.undrain()
    assert paused.num_computed > 0
    for rid in "ab":
        engine.submit(rid, PROMPTS[rid], params[rid])
    for event in engine.step():
        out[event.request_id].append(event.token_id)
    assert not engine.blocks.can_grow(Sequence("x", [0], SamplingParams()), paused.num_computed)
    assert engine.adopt(paused) is False
    for event in engine.run():
        out[event.request_id].append(event.token_id)
    assert out == roomy


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fixed_shape_decode_steps_run_and_agree(checkpoint: Path, device: str) -> None:
    """With `cuda_graphs` every decode step runs the fixed-shape path (captured and
    replayed on a GPU, run as is on a CPU); prefills and mixed steps stay eager; tokens are
    the same as without."""
    params = dict.fromkeys(PROMPTS, SamplingParams(max_tokens=10, ignore_eos=True))
    config = EngineConfig(num_blocks=64, block_size=4, cuda_graphs=True,
                          scheduler=SchedulerConfig(max_batched_tokens=16))
    engine = local_engine(checkpoint, config, device=device)
    graphs = engine.runner.graphs
    assert graphs is not None and engine.runner.cache.num_blocks == 65   # + the scratch
    assert _generate(engine, params) == _generate(_engine(checkpoint, device=device), params)
    assert all((g.graph is not None) == (device == "cuda") for g in graphs.graphs.values())
    assert graphs.steps >= 8   # ten tokens each, the first from a prefill
    assert all(n & (n - 1) == 0 for key in graphs.graphs for n in key)   # powers of two


PROMISES = [pytest.param("cpu", "float32", id="cpu-fp32"),
            pytest.param("cuda", "bfloat16", id="cuda-bf16", marks=pytest.mark.gpu),
            pytest.param("cuda", "float32", id="cuda-fp32", marks=pytest.mark.gpu)]


@pytest.mark.parametrize(("device", "dtype"), PROMISES)
def test_what_a_moved_request_is_promised(checkpoint: Path, device: str, dtype: str) -> None:
    """The promise of docs/gpu.md. Requests move mid-stream (their KV cache handed over)
    to an engine where another request shares their batch. Everywhere: the tokens sent
    before the move are kept, the stream goes on with no gap and no duplicate, and every
    token is the greedy choice for exactly the tokens before it, up to the near tie of the
    dtype (checked against fp32 logits on the CPU). In fp32 the outputs also equal an
    uninterrupted run's."""
    from spotserve.worker.greedy_check import shortfalls, tolerance_for
    params = SamplingParams(max_tokens=14, ignore_eos=True)
    first = _engine(checkpoint, dtype=dtype, device=device)
    for rid, prompt in PROMPTS.items():
        first.submit(rid, prompt, params)
    events = [e for _ in range(6) for e in first.step()]
    states = first.publish()
    second = _engine(checkpoint, dtype=dtype, device=device)
    second.runner.shares = first.runner.shares    # the handed-over pieces, as after a pull
    second.submit("other", [7, 7, 7, 1, 2], params)
    assert all(second.adopt(state) for state in states)
    events += second.run()
    out: dict[str, list[int]] = {rid: [] for rid in PROMPTS}
    for event in events:
        if event.request_id in out:
            assert event.index == len(out[event.request_id])   # no gap, no duplicate
            out[event.request_id].append(event.token_id)
    reference = _engine(checkpoint)    # fp32 on the CPU
    for rid, tokens in out.items():
        assert len(tokens) == params.max_tokens
        worst = max(shortfalls(reference, PROMPTS[rid], tokens))
        assert worst <= tolerance_for(dtype), (rid, worst)
    if dtype == "float32":
        uninterrupted = _generate(_engine(checkpoint, dtype=dtype, device=device),
                                  dict.fromkeys(PROMPTS, params))
        assert out == uninterrupted


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_half_precision_tracks_cpu_fp32(checkpoint: Path, dtype: str) -> None:
    from spotserve.worker.model.attention import AttentionBatch, SequenceChunk
    prompt = PROMPTS["c"]
    logits = []
    for engine in (_engine(checkpoint), _engine(checkpoint, dtype=dtype, device="cuda")):
        model, cache = engine.runner.model, engine.runner.cache
        batch = AttentionBatch.build([SequenceChunk(len(prompt), len(prompt), range(8))], 4,
                                     model.device)
        with torch.inference_mode():
            hidden = model(torch.tensor(prompt, device=model.device), batch, cache.layers)
            logits.append(model.compute_logits(hidden).cpu())
    scale = float(logits[0].abs().max())
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=0.05 * scale)
    assert (logits[1].argmax(-1) == logits[0].argmax(-1)).float().mean() > 0.9


class _SmallDevice:
    """A runner's step that runs out of device memory on steps of more than `limit`
    tokens (`times` times at most: a transient shortage), as torch raises it on CUDA."""

    def __init__(self, engine: Engine, limit: int, times: int = 1 << 30) -> None:
        self.step, self.limit, self.times = engine.runner.step, limit, times
        self.failed = 0
        engine.runner.step = self  # type: ignore[method-assign]

    def __call__(self, plan: object) -> dict[str, int]:
        tokens = sum(len(c.token_ids) for c in plan.chunks)  # type: ignore[attr-defined]
        if tokens > self.limit and self.failed < self.times:
            self.failed += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.step(plan)  # type: ignore[arg-type, no-any-return]


def _events(engine: Engine) -> tuple[dict[str, list[int]], dict[str, str]]:
    tokens: dict[str, list[int]] = {}
    errors: dict[str, str] = {}
    for event in engine.run():
        if event.error:
            errors[event.request_id] = event.error
        else:
            assert event.token_id is not None
            tokens.setdefault(event.request_id, []).append(event.token_id)
    return tokens, errors


def test_out_of_memory_in_a_step_sets_the_biggest_request_aside_then_rejects_it(
        checkpoint: Path) -> None:
    """A step that does not fit in device memory costs no other request anything: the
    request with the most tokens in it steps aside and runs later (a transient shortage:
    its tokens are the same), or, failing again, is rejected with the reason, while the
    others finish with their own tokens and the engine takes new requests after."""
    params = dict.fromkeys(PROMPTS, SamplingParams(max_tokens=8, ignore_eos=True))
    reference = _generate(_engine(checkpoint, budget=64), params)

    transient = _engine(checkpoint, budget=64)
    device = _SmallDevice(transient, limit=len(PROMPTS["a"]) + len(PROMPTS["b"]), times=1)
    for rid, p in params.items():
        transient.submit(rid, PROMPTS[rid], p)
    tokens, errors = _events(transient)
    assert device.failed == 1 and not errors and tokens == reference
    assert not transient.out_of_memory   # finished: nothing of it is kept

    short = _engine(checkpoint, budget=64)
    device = _SmallDevice(short, limit=len(PROMPTS["c"]) - 1)   # "c" never fits
    for rid, p in params.items():
        short.submit(rid, PROMPTS[rid], p)
    tokens, errors = _events(short)
    assert list(errors) == ["c"] and device.failed == 2
    assert "out of memory: request c (30 tokens" in errors["c"] and "2.00 GiB" in errors["c"]
    assert tokens == {rid: reference[rid] for rid in ("a", "b")}
    assert short.scheduler.get("c") is None and short.blocks.num_free == short.blocks.num_blocks
    short.submit("a2", PROMPTS["a"], params["a"])           # it goes on serving
    assert _events(short) == ({"a2": reference["a"]}, {})
