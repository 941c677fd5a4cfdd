"""The emulated cloud's script: an availability trace turned into timed events (pure).

A trace says when instances become available (`add`) and when they are terminated
(`remove`), in trace seconds; `compression` divides every time. A removal becomes a
termination notice `grace` seconds (real time) before the kill, unless the node is listed
in `no_notice`, in which case it is killed without warning. Traces are read with the
simulator's parser (`spotserve.traces`), so the SpotServe formats (g4dn.csv,
JSON-lines segments) work as they are.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from spotserve.errors import SpotserveError
from spotserve.traces import Trace, TraceEvent, load_trace

ADD, NOTICE, KILL, RATE = "add", "notice", "kill", "rate"


@dataclass(frozen=True)
class CloudEvent:
    at: float          # real seconds after the start
    kind: str          # add | notice | kill | rate
    instance: str = ""
    rate: float | None = None


@dataclass(frozen=True)
class Script:
    events: tuple[CloudEvent, ...]
    end: float         # real seconds
    source: str

    def kills(self, notice: bool) -> list[str]:
        noticed = {e.instance for e in self.events if e.kind == NOTICE}
        return [e.instance for e in self.events
                if e.kind == KILL and (e.instance in noticed) == notice]


# Trace seconds. Instances are 1-GPU and a replica needs 2 GPUs (P=2 or M=2), so an odd
# count leaves a warm standby that takes over a doomed position.
DEFAULT_TRACE = Trace((
    TraceEvent(0.0, "add", ("n1", "n2", "n3")),
    TraceEvent(15.0, "add", ("n4", "n5")),
    TraceEvent(45.0, "remove", ("n2",)),
    TraceEvent(55.0, "add", ("n6",)),
    TraceEvent(80.0, "remove", ("n4",)),
    TraceEvent(110.0, "remove", ("n5",)),
), 125.0, "built-in synthetic trace")
DEFAULT_NO_NOTICE = ("n4",)


def script(trace: Trace, compression: float = 1.0, grace: float = 10.0,
           no_notice: Collection[str] = ()) -> Script:
    if not compression > 0:
        raise SpotserveError(f"time compression must be > 0, got {compression}")
    if grace < 0:
        raise SpotserveError(f"grace period must be >= 0 seconds, got {grace}")
    unknown = set(no_notice) - set(trace.nodes())
    if unknown:
        raise SpotserveError(f"--no-notice {', '.join(sorted(unknown))}: not a node of "
                             f"{trace.source}")
    out: list[CloudEvent] = []
    for event in trace.events:
        at = event.time_s / compression
        if event.rate is not None:
            out.append(CloudEvent(at, RATE, rate=event.rate))
        for node in event.nodes:
            if event.kind == ADD:
                out.append(CloudEvent(at, ADD, node))
            elif event.kind == "remove":
                if node not in no_notice:
                    out.append(CloudEvent(max(0.0, at - grace), NOTICE, node))
                out.append(CloudEvent(at, KILL, node))
    out.sort(key=lambda e: e.at)
    return Script(tuple(out), trace.end_s / compression, trace.source)


def load_script(path: str | None, compression: float, grace: float,
                no_notice: Collection[str] = ()) -> Script:
    """The built-in trace (path None) or a SpotServe trace file, as a script."""
    if path is None:
        return script(DEFAULT_TRACE, compression, grace,
                      no_notice if no_notice else DEFAULT_NO_NOTICE)
    return script(load_trace(path), compression, grace, no_notice)
