"""Prometheus metrics of one worker: bytes streamed in and out, transfer time, decode steps,
running requests and KV blocks. Each worker has its own registry (several can share a
process in tests); `serve` exposes it over HTTP for scraping.

prometheus-client is optional at import time: without it the metrics are no-ops and only
`--metrics` (serving them) fails, with a message saying what to install.
"""

from __future__ import annotations

from typing import Any

from spotserve.errors import SpotserveError

prom: Any
try:
    import prometheus_client as prom
except ImportError:  # pragma: no cover - the worker image should install it
    prom = None


class _NoMetric:
    def labels(self, *_: object) -> _NoMetric:
        return self

    def inc(self, *_: object) -> None: ...

    def set(self, *_: object) -> None: ...

    def observe(self, *_: object) -> None: ...


def _metric(kind: str, name: str, doc: str, registry: Any, **kwargs: Any) -> Any:
    if prom is None:
        return _NoMetric()
    return getattr(prom, kind)(name, doc, registry=registry, **kwargs)


class WorkerMetrics:
    def __init__(self) -> None:
        r = self.registry = prom.CollectorRegistry() if prom is not None else None
        self.bytes_in = _metric("Counter", "spotserve_worker_bytes_in", "Weight and KV bytes "
                                "gathered for a role, by source", r, labelnames=["source"])
        self.bytes_out = _metric("Counter", "spotserve_worker_bytes_out",
                                 "Bytes served to peers over PullTensors", r)
        self.transfer_seconds = _metric(
            "Histogram", "spotserve_worker_transfer_seconds",
            "Time to gather a role's weights and KV", r,
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120))
        self.decode_steps = _metric("Counter", "spotserve_worker_decode_steps",
                                    "Engine steps run", r)
        self.pipeline_failures = _metric(
            "Counter", "spotserve_worker_pipeline_failures",
            "Pipelines that broke under this worker (a peer died or stopped answering)", r)
        self.step_seconds = _metric("Histogram", "spotserve_worker_step_seconds",
                                    "Engine step time", r,
                                    buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2))
        self.running = _metric("Gauge", "spotserve_worker_running_requests",
                               "Requests in the batch", r)
        self.waiting = _metric("Gauge", "spotserve_worker_waiting_requests", "Requests queued",
                               r)
        self.kv_blocks_used = _metric("Gauge", "spotserve_worker_kv_blocks_used",
                                      "KV blocks in use", r)
        self.kv_blocks_total = _metric("Gauge", "spotserve_worker_kv_blocks_total",
                                       "KV blocks", r)
        self.epoch = _metric("Gauge", "spotserve_worker_epoch", "Configuration epoch", r)
        # vLLM's name, for existing dashboards: the fraction of KV blocks in use (0 to 1)
        self.kv_usage = _metric("Gauge", "vllm:kv_cache_usage_perc",
                                "Fraction of the KV cache in use (1 = full)", r,
                                labelnames=["model_name"])

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics on host:port (0 = any free port); the port used."""
        if prom is None:
            raise SpotserveError("--metrics needs prometheus-client (pip install "
                                 "prometheus-client)")
        server, _ = prom.start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)
