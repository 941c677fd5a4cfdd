"""Next-token choice: greedy, temperature, top-k, top-p, for a whole batch at once.

Every row is filtered and drawn on the logits' device in one pass: no per-row loop, no
copy of a row's vocabulary to the host; the batch's tokens come back in one transfer.

Randomness is keyed by (request seed, token position), never a shared stream: a request
draws the same numbers whatever it is batched with, and after a migration or a re-prefill
it samples what it would have sampled. The numbers come from a counter-based hash of
(key, vocabulary index) in integer arithmetic, so CPU and GPU draw the same ones. The draw
is an exponential race (argmax of p / E with E ~ Exp(1)), exact sampling from p.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from spotserve.worker.engine.sequence import SamplingParams

_MASK64 = (1 << 64) - 1
_M32 = (1 << 32) - 1


def position_key(seed: int, position: int) -> int:
    """A well-mixed 63-bit seed for (seed, position) (splitmix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for 0 <= x < 2^32 in int64, with no intermediate past 2^48."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with good avalanche (xor-shift-multiply, two rounds)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniforms(keys: Sequence[int], index: torch.Tensor) -> torch.Tensor:
    """float32 in (0, 1) shaped like `index` [rows, n] (vocabulary indices): element
    [r, j] a function of keys[r] and index[r, j] alone."""
    key = torch.tensor(keys, dtype=torch.int64, device=index.device).unsqueeze(1)
    x = _hash32((index.to(torch.int64) + (key & _M32)) & _M32)
    x = _hash32(x ^ ((key >> 32) & _M32))
    return (x.to(torch.float64).add_(0.5).mul_(2.0 ** -32)).to(torch.float32)


def filter_batch(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature-scaled logits [rows, vocab], tokens outside each row's top-k / top-p set
    to -inf (greedy rows are left at temperature 1)."""
    vocab = logits.shape[-1]
    device = logits.device
    temperature = torch.tensor([1.0 if p.greedy else p.temperature for p in params],
                               dtype=logits.dtype, device=device).unsqueeze(1)
    logits = logits / temperature
    top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_p = [p.top_p if p.top_p < 1.0 else 2.0 for p in params]   # 2: never drops a token
    if min(top_k) == vocab and min(top_p) > 1.0:
        return logits
    ordered, order = torch.sort(logits, dim=-1, descending=True)
    if min(top_k) < vocab:
        ks = torch.tensor(top_k, device=device).unsqueeze(1)
        kth = ordered.gather(1, ks - 1)
        cut = ordered < kth
        ordered = ordered.masked_fill(cut, float("-inf"))
    else:
        cut = torch.zeros_like(ordered, dtype=torch.bool)
    if min(top_p) <= 1.0:
        probs = ordered.softmax(-1)
        before = probs.cumsum(-1) - probs
        # drop a token when the tokens before it already reach top_p (the first always stays)
        limit = torch.tensor(top_p, dtype=probs.dtype, device=device).unsqueeze(1)
        cut = cut | (before >= limit)
    drop = torch.zeros_like(cut).scatter(1, order, cut)
    return logits.masked_fill(drop, float("-inf"))


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """`filter_batch` for one row [vocab]."""
    return filter_batch(logits.unsqueeze(0), [params])[0]


def sample_tensor(logits: torch.Tensor, params: Sequence[SamplingParams],
                  positions: Sequence[int]) -> torch.Tensor:
    """One token per row of fp32 `logits` [rows, vocab], on the logits' device. Only the
    candidates are raced: the top max(k) of each row when every sampled row has a top-k
    (known here, with no look at the device), else the whole vocabulary."""
    greedy = torch.argmax(logits, dim=-1)
    if all(p.greedy for p in params):
        return greedy
    vocab = logits.shape[-1]
    probs = filter_batch(logits, params).softmax(-1)
    width = max((p.top_k if 0 < p.top_k < vocab else vocab) for p in params if not p.greedy)
    if width < vocab:
        probs, index = torch.topk(probs, width, dim=-1)
    else:
        index = torch.arange(vocab, device=logits.device).expand(len(params), vocab)
    keys = [position_key(p.seed, pos) for p, pos in zip(params, positions, strict=True)]
    race = uniforms(keys, index).log_().neg_()
    drawn = index.gather(1, torch.argmax(probs / race, dim=-1, keepdim=True)).squeeze(1)
    is_greedy = torch.tensor([p.greedy for p in params], device=logits.device)
    return torch.where(is_greedy, greedy, drawn)


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           positions: Sequence[int]) -> list[int]:
    """One token per row of `logits` [rows, vocab]; one transfer to the host."""
    return [int(t) for t in sample_tensor(logits, params, positions).tolist()]


def sample_one(logits: torch.Tensor, params: SamplingParams, position: int) -> int:
    """The token at `position` for fp32 `logits` [vocab]."""
    return sample(logits.unsqueeze(0), [params], [position])[0]
