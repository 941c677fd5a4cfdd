"""Request arrivals: from a query trace, or generated (Poisson, Gamma with a CV, per-minute
rates), always from a seed so the same inputs give the same requests."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from spotserve.errors import SpotserveError
from spotserve.traces import Query


@dataclass(frozen=True)
class Arrival:
    id: int
    time_s: float
    input_tokens: int
    output_tokens: int


def from_queries(queries: Sequence[Query], output_tokens: int, until_s: float,
                 input_tokens: int | None = None) -> tuple[Arrival, ...]:
    """The queries arriving before `until_s` (prompt length from the trace unless given)."""
    return tuple(Arrival(n, q.arrival_s, input_tokens or q.input_tokens, output_tokens)
                 for n, q in enumerate(q for q in queries if q.arrival_s < until_s))


def gaps(rng: np.random.Generator, rate: float, cv: float, count: int) -> np.ndarray:
    """`count` inter-arrival gaps with mean 1/rate: exponential (cv = 1) or Gamma."""
    if rate <= 0:
        raise SpotserveError("the request rate must be positive")
    if cv <= 0:
        raise SpotserveError("the coefficient of variation must be positive")
    shape = 1.0 / (cv * cv)
    return rng.gamma(shape, 1.0 / (rate * shape), count)


def generated(rates: Sequence[float], period_s: float, until_s: float, cv: float, seed: int,
              input_tokens: int, output_tokens: int) -> tuple[Arrival, ...]:
    """A Gamma renewal process (Poisson for cv = 1) whose rate is `rates[k]` during the
    k-th period of `period_s` seconds (the last rate holds after the list ends)."""
    if any(r < 0 for r in rates) or not rates:
        raise SpotserveError("rates must be non-negative")
    rng = np.random.default_rng(seed)
    times: list[float] = []
    t = 0.0
    while t < until_s:
        k = min(int(t // period_s), len(rates) - 1)
        rate = rates[k]
        period_end = until_s if k == len(rates) - 1 else min(until_s, (k + 1) * period_s)
        if rate <= 0:
            t = period_end
            continue
        for gap in gaps(rng, rate, cv, 256):
            t += float(gap)
            if t >= period_end:
                break
            times.append(t)
        else:
            continue
        t = period_end
    return tuple(Arrival(n, s, input_tokens, output_tokens) for n, s in enumerate(times))
