"""Trace-driven simulator of serving on spot instances (`spotserve simulate`).

`traces` parses availability traces (SpotServe's g4dn CSV and JSON-lines segments), query
traces and per-minute rates; `workload` turns them, or a seeded Poisson/Gamma process, into
arrivals. `engine` is a discrete-event simulation at request granularity (batches,
interruptions, KV resume or re-prefill, instance-hours); `policies` are the approaches —
SpotServe and its cumulative ablations, re-parallelization, re-routing, on-demand — all
driven by the planner (`spotserve.operator.planner`) through the thin `adapter`, with no
formula of their own. `runner` wires a `Setup` to an approach, `report` and `plots` write
JSON, markdown and PNGs, `cli` is the command.
"""
