"""Prometheus metrics of the router: `spotserve_*` plus the vLLM names dashboards expect.

Each `RouterMetrics` has its own registry, so several routers (in tests) do not collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class RouterMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        r, m = self.registry, model_name
        self.requests = Counter("spotserve_requests", "Finished requests by finish reason.",
                                ["finish_reason"], registry=r)
        self.rejected = Counter("spotserve_requests_rejected",
                                "Requests refused before running, by reason.",
                                ["reason"], registry=r)
        self.pipeline_full = Counter(
            "spotserve_pipeline_full", "Submissions a driver refused as full (other router "
            "replicas filled it); each went to another pipeline or waited.", registry=r)
        self.resumed = Counter("spotserve_requests_resumed",
                               "Resumptions of interrupted requests, by mode.", ["mode"],
                               registry=r)
        self.prompt_tokens = Counter("spotserve_prompt_tokens", "Prompt tokens.", registry=r)
        self.generation_tokens = Counter("spotserve_generation_tokens",
                                         "Generated tokens sent to clients.", registry=r)
        self.ttft = Histogram("spotserve_time_to_first_token_seconds",
                              "Arrival to first token.", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("spotserve_inter_token_latency_seconds",
                             "Time between successive token deliveries.",
                             buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("spotserve_e2e_request_latency_seconds", "Arrival to finish.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.waiting = Gauge("spotserve_num_requests_waiting", "Requests in the queue.",
                             registry=r)
        self.running = Gauge("spotserve_num_requests_running",
                             "Requests running on a pipeline.", registry=r)
        self.arrival_rate = Gauge("spotserve_arrival_rate",
                                  "Arrival rate estimate (EWMA), requests per second.",
                                  registry=r)
        self.pipelines = Gauge("spotserve_pipelines", "Pipelines by state.", ["state"],
                               registry=r)
        # vLLM-compatible aliases, for existing dashboards and autoscalers.
        self.vllm_waiting = Gauge("vllm:num_requests_waiting", "Requests waiting.",
                                  ["model_name"], registry=r).labels(m)
        self.vllm_running = Gauge("vllm:num_requests_running", "Requests running.",
                                  ["model_name"], registry=r).labels(m)
        self.vllm_ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.",
                                   ["model_name"], buckets=LATENCY_BUCKETS,
                                   registry=r).labels(m)
        self.vllm_e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end latency.",
                                  ["model_name"], buckets=LATENCY_BUCKETS,
                                  registry=r).labels(m)
        self.vllm_prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens.",
                                          ["model_name"], registry=r).labels(m)
        self.vllm_generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.",
                                              ["model_name"], registry=r).labels(m)
        self.vllm_success = Counter("vllm:request_success", "Finished requests, by why.",
                                    ["model_name", "finished_reason"], registry=r)
        # the same observations under vLLM's old and new names (dashboards use either)
        self.vllm_itl = [Histogram(name, "Time between output tokens.", ["model_name"],
                                   buckets=TOKEN_BUCKETS, registry=r).labels(m)
                         for name in ("vllm:time_per_output_token_seconds",
                                      "vllm:inter_token_latency_seconds")]
        self.model_name = m

    def set_queue(self, waiting: int, running: int) -> None:
        self.waiting.set(waiting)
        self.vllm_waiting.set(waiting)
        self.running.set(running)
        self.vllm_running.set(running)

    def observe_ttft(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.vllm_ttft.observe(seconds)

    def observe_e2e(self, seconds: float) -> None:
        self.e2e.observe(seconds)
        self.vllm_e2e.observe(seconds)

    def observe_itl(self, seconds: float) -> None:
        self.itl.observe(seconds)
        for histogram in self.vllm_itl:
            histogram.observe(seconds)

    def count_tokens(self, prompt: int = 0, generated: int = 0) -> None:
        if prompt:
            self.prompt_tokens.inc(prompt)
            self.vllm_prompt_tokens.inc(prompt)
        if generated:
            self.generation_tokens.inc(generated)
            self.vllm_generation_tokens.inc(generated)

    def count_finished(self, reason: str) -> None:
        """A request ended: stop, length, cancelled or error (vLLM says abort for the last
        two)."""
        self.requests.labels(reason).inc()
        self.vllm_success.labels(self.model_name,
                                 reason if reason in ("stop", "length") else "abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
