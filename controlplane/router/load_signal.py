"""The load signal the controller re-plans on: arrival rate and latency statistics.

`ArrivalRate` keeps two estimates of requests per second: an exponentially weighted moving
average (reacts smoothly; time constant `tau`) and a plain count over a sliding window.
`LatencyWindow` keeps the most recent samples of a latency for percentiles. Both take the
time as an argument, so they are tested without sleeping.
"""

from __future__ import annotations

import math
from collections import deque


class ArrivalRate:
    def __init__(self, *, tau_seconds: float = 30.0, window_seconds: float = 60.0,
                 start: float = 0.0) -> None:
        self.tau = tau_seconds
        self.window = window_seconds
        self.start = start
        self._ewma = 0.0
        self._last = start
        self._arrivals: deque[float] = deque()

    def record(self, now: float) -> None:
        self._ewma = self._decayed(now) + 1.0 / self.tau
        self._last = now
        self._arrivals.append(now)
        self._trim(now)

    def ewma(self, now: float) -> float:
        """Requests per second, each arrival weighted by exp(-age / tau)."""
        return self._decayed(now)

    def windowed(self, now: float) -> float:
        """Arrivals in the last `window` seconds over the window (or the uptime if shorter)."""
        self._trim(now)
        span = min(self.window, max(now - self.start, 1e-9))
        return len(self._arrivals) / span

    def _decayed(self, now: float) -> float:
        return self._ewma * math.exp(-max(now - self._last, 0.0) / self.tau)

    def _trim(self, now: float) -> None:
        while self._arrivals and self._arrivals[0] <= now - self.window:
            self._arrivals.popleft()


class LatencyWindow:
    """The last `size` samples of a latency, in seconds."""

    def __init__(self, size: int = 2048) -> None:
        self._samples: deque[float] = deque(maxlen=size)

    def add(self, seconds: float) -> None:
        self._samples.append(seconds)

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile (q in [0, 100]); 0.0 with no samples."""
        if not self._samples:
            return 0.0
        ordered = sorted(self._samples)
        rank = max(math.ceil(q / 100.0 * len(ordered)), 1)
        return ordered[min(rank, len(ordered)) - 1]

    def __len__(self) -> int:
        return len(self._samples)
