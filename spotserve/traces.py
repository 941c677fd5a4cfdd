"""Instance-availability and request-arrival traces: parsing, with one clear error per bad file.

Availability traces come in the two formats of the SpotServe artifact:

- CSV (`traces/g4dn.csv`): `time_ms,add|remove,NODE` one event per line;
- JSON lines (`traces/trace_*.txt`): `[t_ms, "add"|"remove"|"other"|"DONE",
  {"nodes": [...], "required_tpt": x}]`; `required_tpt` changes the required request rate,
  `DONE` ends the trace.

Times in a trace are when an instance becomes available (`add`) and when it is terminated
(`remove`); the simulator derives notices (a grace period earlier) and boot delays itself.
Query traces (`queries/*.txt`) are CSV lines `id, arrival_s, seq_len, offset`; per-minute
rate files (`arrival-rates.csv`) are comma- or newline-separated requests/s per minute.
Local mode replays the same `Trace` objects.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spotserve.errors import SpotserveError

KINDS = ("add", "remove", "rate")


@dataclass(frozen=True)
class TraceEvent:
    """At `time_s`: `nodes` join (add) or are terminated (remove); `rate` (when not None)
    is the new required request rate."""

    time_s: float
    kind: str
    nodes: tuple[str, ...] = ()
    rate: float | None = None


@dataclass(frozen=True)
class Trace:
    events: tuple[TraceEvent, ...]
    end_s: float
    source: str = "trace"

    @property
    def max_instances(self) -> int:
        """The most instances held at once."""
        held: set[str] = set()
        most = 0
        for event in self.events:
            if event.kind == "add":
                held |= set(event.nodes)
            elif event.kind == "remove":
                held -= set(event.nodes)
            most = max(most, len(held))
        return most

    def nodes(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for event in self.events:
            if event.kind == "add":
                seen.update(dict.fromkeys(event.nodes))
        return tuple(seen)


@dataclass(frozen=True)
class Query:
    id: int
    arrival_s: float
    input_tokens: int


def _read(path: str | Path, what: str) -> tuple[Path, str]:
    file = Path(path)
    try:
        return file, file.read_text()
    except FileNotFoundError:
        raise SpotserveError(f"{file}: no such {what} file") from None
    except IsADirectoryError:
        raise SpotserveError(f"{file}: is a directory, expected a {what} file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpotserveError(f"{file}: cannot read {what}: {exc}") from None


def load_trace(path: str | Path) -> Trace:
    """Parse an availability trace; the format is told from the first non-empty line."""
    file, text = _read(path, "trace")
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise SpotserveError(f"{file}: trace is empty")
    parse = _json_line if lines[0][1].startswith("[") else _csv_line
    events: list[TraceEvent] = []
    end: float | None = None
    for number, line in lines:
        where = f"{file}:{number}"
        event = parse(line, where)
        if events and event.time_s < events[-1].time_s:
            raise SpotserveError(f"{where}: time goes backwards ({event.time_s * 1000:g} ms)")
        if event.kind == "done":
            end = event.time_s
            break
        events.append(event)
    if not events:
        raise SpotserveError(f"{file}: trace has no events")
    return Trace(tuple(_merge(events)), events[-1].time_s if end is None else end, str(file))


def _merge(events: list[TraceEvent]) -> list[TraceEvent]:
    """Consecutive events of one kind at one time become one event (the CSV's node lines)."""
    out: list[TraceEvent] = []
    for event in events:
        last = out[-1] if out else None
        if (last is not None and last.time_s == event.time_s and last.kind == event.kind
                and event.kind != "rate" and event.rate is None and last.rate is None):
            out[-1] = TraceEvent(last.time_s, last.kind, last.nodes + event.nodes)
        else:
            out.append(event)
    return out


def _time(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise SpotserveError(f"{where}: time must be a non-negative number of ms "
                             f"(got {value!r})")
    return float(value) / 1000.0


def _csv_line(line: str, where: str) -> TraceEvent:
    parts = [p.strip() for p in line.split(",")]
    if len(parts) != 3:
        raise SpotserveError(f"{where}: expected 'time_ms,add|remove,NODE' (got {line!r})")
    try:
        millis = float(parts[0])
    except ValueError:
        raise SpotserveError(f"{where}: time {parts[0]!r} is not a number") from None
    if parts[1] not in ("add", "remove"):
        raise SpotserveError(f"{where}: event must be add or remove (got {parts[1]!r})")
    if not parts[2]:
        raise SpotserveError(f"{where}: missing node name")
    return TraceEvent(_time(millis, where), parts[1], (parts[2],))


def _json_line(line: str, where: str) -> TraceEvent:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise SpotserveError(f"{where}: malformed JSON ({exc.msg})") from None
    if not (isinstance(item, list) and len(item) in (2, 3)):
        raise SpotserveError(f"{where}: expected [t_ms, kind, {{\"nodes\": [...]}}]")
    time_s, kind = _time(item[0], where), item[1]
    info = item[2] if len(item) == 3 else {}
    if kind not in ("add", "remove", "other", "DONE") or not isinstance(info, dict):
        raise SpotserveError(f"{where}: kind must be add, remove, other or DONE "
                             f"(got {kind!r})")
    nodes = info.get("nodes", [])
    if not isinstance(nodes, list) or not all(isinstance(n, str) and n for n in nodes):
        raise SpotserveError(f"{where}: nodes must be a list of names")
    rate = info.get("required_tpt")
    if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float))
                             or rate < 0):
        raise SpotserveError(f"{where}: required_tpt must be a non-negative number")
    rate = None if rate is None else float(rate)
    if kind == "DONE":
        return TraceEvent(time_s, "done")
    if kind == "other":
        return TraceEvent(time_s, "rate", (), rate)
    return TraceEvent(time_s, kind, tuple(nodes), rate)


def load_queries(path: str | Path) -> tuple[Query, ...]:
    """Parse a query trace (`id, arrival_s, seq_len, offset`), sorted by arrival."""
    file, text = _read(path, "query")
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        try:
            if len(parts) < 3:
                raise ValueError
            query = Query(int(parts[0]), float(parts[1]), int(parts[2]))
        except ValueError:
            raise SpotserveError(f"{file}:{number}: expected 'id, arrival_s, seq_len, offset' "
                                 f"(got {line.strip()!r})") from None
        if query.arrival_s < 0 or query.input_tokens < 1:
            raise SpotserveError(f"{file}:{number}: arrival must be ≥ 0 and seq_len ≥ 1")
        out.append(query)
    if not out:
        raise SpotserveError(f"{file}: query trace is empty")
    return tuple(sorted(out, key=lambda q: (q.arrival_s, q.id)))


def load_rates(path: str | Path) -> tuple[float, ...]:
    """Per-minute request rates (requests/s), separated by commas or newlines."""
    file, text = _read(path, "rate")
    values = [v for v in re.split(r"[,\s]+", text.strip()) if v]
    try:
        rates = tuple(float(v) for v in values)
    except ValueError:
        raise SpotserveError(f"{file}: rates must be numbers separated by commas") from None
    if not rates or any(r < 0 for r in rates):
        raise SpotserveError(f"{file}: need at least one non-negative rate")
    return rates
