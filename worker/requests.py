"""Submit's side of the Worker service: a `SubmitRequest` checked and turned into the
engine's `RequestState` (fresh, resumed by re-prefill, or resumed from a KV cache held
here). No gRPC server here:
errors are `SpotserveError` (a bad request) or `KVUnavailable` (resume by re-prefill)."""

from __future__ import annotations

import zlib

from spotserve.errors import SpotserveError
from spotserve.model_spec import ModelSpec
from spotserve.v1 import common_pb2, worker_pb2
from spotserve.worker.engine.engine import EngineConfig
from spotserve.worker.engine.kv_shares import KVShares
from spotserve.worker.engine.sequence import RequestState, SamplingParams
from spotserve.worker.kv_store import PausedRequests


class KVUnavailable(LookupError):
    """A KV resume asked for a cache this worker does not hold (FAILED_PRECONDITION)."""


def sampling_params(request: worker_pb2.SubmitRequest) -> SamplingParams:
    """The engine's parameters, with the contract's defaults for unset fields."""
    s = request.sampling
    if s.max_tokens <= 0:
        raise SpotserveError("sampling.max_tokens must be positive")
    seed = s.seed if s.HasField("seed") else zlib.crc32(request.request_id.encode())
    return SamplingParams(
        max_tokens=s.max_tokens, temperature=s.temperature if s.HasField("temperature") else 1.0,
        top_k=s.top_k if s.HasField("top_k") else 0,
        top_p=s.top_p if s.HasField("top_p") else 1.0, seed=seed,
        stop_token_ids=tuple(s.stop_token_ids), ignore_eos=s.ignore_eos)


def _check(request: worker_pb2.SubmitRequest, params: SamplingParams, spec: ModelSpec,
           engine: EngineConfig) -> None:
    prompt, generated = request.prompt_token_ids, request.resume.generated_token_ids
    if not request.request_id:
        raise SpotserveError("request_id is empty")
    if not prompt:
        raise SpotserveError("prompt_token_ids is empty")
    if any(not 0 <= t < spec.vocab_size for t in (*prompt, *generated)):
        raise SpotserveError(f"token ids must be in [0, {spec.vocab_size})")
    context = min(engine.scheduler.max_model_len, spec.max_position)
    if len(prompt) + params.max_tokens > context:
        limit = "the model's" if context == spec.max_position else "this worker's --max-model-len"
        raise SpotserveError(f"prompt ({len(prompt)}) + max_tokens ({params.max_tokens}) "
                             f"exceeds the context length {context} ({limit})")
    cache_tokens = engine.num_blocks * engine.block_size
    if len(prompt) + params.max_tokens > cache_tokens:
        raise SpotserveError(f"prompt ({len(prompt)}) + max_tokens ({params.max_tokens}) "
                             f"exceeds this worker's KV cache of {cache_tokens} tokens")
    if len(generated) >= params.max_tokens:
        raise SpotserveError(f"request {request.request_id} already has its "
                             f"{params.max_tokens} tokens")


def request_state(request: worker_pb2.SubmitRequest, spec: ModelSpec, engine: EngineConfig,
                  paused: PausedRequests, shares: KVShares) -> RequestState:
    """What the engine runs for `request`. A KV resume needs this driver's share of the
    cache (the other ranks' shares are checked when the engine adopts it); it covers the
    tokens the router committed, or a prefix of them."""
    params = sampling_params(request)
    _check(request, params, spec, engine)
    rid, prompt = request.request_id, list(request.prompt_token_ids)
    generated = list(request.resume.generated_token_ids)
    state = RequestState(rid, prompt, generated, params)
    if request.resume.mode != common_pb2.RESUME_MODE_KV:
        return state
    held = shares.tokens(rid)
    if held == 0:
        raise KVUnavailable(f"no KV cache for request {rid!r} here; resume by re-prefill")
    drained = paused.get(rid)
    if drained is not None:
        kept = drained.state.output_token_ids
        common = min(len(kept), len(generated))
        if drained.state.prompt_token_ids != prompt or kept[:common] != generated[:common]:
            raise KVUnavailable(f"request {rid!r}: the kept KV cache belongs to other tokens")
    # the router may have committed fewer tokens than were computed: use the prefix
    state.num_computed = min(held, len(prompt) + len(generated) - 1)
    return state

