"""Prometheus metrics of one worker: bytes streamed in and out, transfer time, decode steps,
running requests and KV blocks. Each worker has its own registry (several can share a
process in tests); `serve` exposes it over HTTP for scraping."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class WorkerMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.bytes_in = Counter("spotserve_worker_bytes_in", "Weight and KV bytes gathered "
                                "for a role, by source", ["source"], registry=r)
        self.bytes_out = Counter("spotserve_worker_bytes_out", "Bytes served to peers over "
                                 "PullTensors", registry=r)
        self.transfer_seconds = Histogram(
            "spotserve_worker_transfer_seconds", "Time to gather a role's weights and KV",
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120), registry=r)
        self.decode_steps = Counter("spotserve_worker_decode_steps", "Engine steps run",
                                    registry=r)
        self.step_seconds = Histogram("spotserve_worker_step_seconds", "Engine step time",
                                      buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2),
                                      registry=r)
        self.running = Gauge("spotserve_worker_running_requests", "Requests in the batch",
                             registry=r)
        self.waiting = Gauge("spotserve_worker_waiting_requests", "Requests queued",
                             registry=r)
        self.kv_blocks_used = Gauge("spotserve_worker_kv_blocks_used", "KV blocks in use",
                                    registry=r)
        self.kv_blocks_total = Gauge("spotserve_worker_kv_blocks_total", "KV blocks",
                                     registry=r)
        self.epoch = Gauge("spotserve_worker_epoch", "Configuration epoch", registry=r)

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics on host:port (0 = any free port); the port used."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(server.server_port)
