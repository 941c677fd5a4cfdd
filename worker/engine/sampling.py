"""Next-token choice: greedy, temperature, top-k, top-p.

Randomness comes from a generator keyed by (request seed, token position), never from a
shared stream: a request draws the same numbers whatever it is batched with, and after a
migration or a re-prefill it samples what it would have sampled. The draw is an
exponential race (argmax of p / E with E ~ Exp(1)), exact sampling from p.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from spotserve.worker.engine.sequence import SamplingParams

_MASK64 = (1 << 64) - 1


def position_key(seed: int, position: int) -> int:
    """A well-mixed 63-bit seed for (seed, position) (splitmix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + position + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature-scaled logits [vocab] with tokens outside top-k / top-p set to -inf."""
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop = (cumulative - ordered.softmax(-1)) >= params.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample_one(logits: torch.Tensor, params: SamplingParams, position: int) -> int:
    """The token at `position` for fp32 `logits` [vocab]."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = filter_logits(logits, params).softmax(-1)
    generator = torch.Generator(device="cpu").manual_seed(position_key(params.seed, position))
    race = torch.empty(probs.shape[-1]).exponential_(generator=generator)
    return int(torch.argmax(probs.cpu() / race))


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           positions: Sequence[int]) -> list[int]:
    """One token per row of `logits` [rows, vocab]."""
    if all(p.greedy for p in params):
        return [int(t) for t in torch.argmax(logits, dim=-1).tolist()]
    return [sample_one(row, p, pos) for row, p, pos in zip(logits, params, positions,
                                                           strict=True)]
