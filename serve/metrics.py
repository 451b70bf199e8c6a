"""Prometheus metrics for one server, in its own `CollectorRegistry` (two apps in a process never collide).

Latency histograms follow vLLM's definitions: time to first token (arrival to first token), inter-token
latency (between consecutive tokens of one request), end-to-end latency and queue time. Gauges that
describe the process (resident and peak memory, accelerator memory) are read at scrape time.
"""

from __future__ import annotations

# Buckets in seconds: CPU serving spans milliseconds (tiny models) to minutes (long CPU generations).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        from slimlm.serve.engine import peak_rss_bytes, rss_bytes

        self.registry = r = CollectorRegistry()
        self.ttft = Histogram("slimlm_time_to_first_token_seconds", "Arrival to first generated token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("slimlm_inter_token_latency_seconds", "Time between consecutive tokens of a request.",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("slimlm_e2e_request_latency_seconds", "Arrival to last token.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("slimlm_request_queue_time_seconds", "Arrival to the start of prefill.",
                               buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("slimlm_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.cached_prompt_tokens = Counter("slimlm_prompt_tokens_cached",
                                            "Prompt tokens whose keys and values came from the prefix cache.",
                                            registry=r)
        self.generation_tokens = Counter("slimlm_generation_tokens", "Tokens generated.", registry=r)
        self.requests = Counter("slimlm_requests", "Finished requests by finish reason.", ["finish_reason"],
                                registry=r)
        for reason in ("stop", "length", "abort", "error"):
            self.requests.labels(reason)
        self.running = Gauge("slimlm_requests_running", "Sequences in the decoding batch.", registry=r)
        self.waiting = Gauge("slimlm_requests_waiting", "Requests waiting for a batch slot.", registry=r)
        Gauge("slimlm_process_resident_memory_bytes", "Resident set size.", registry=r).set_function(rss_bytes)
        Gauge("slimlm_process_peak_memory_bytes", "Peak resident set size.", registry=r).set_function(peak_rss_bytes)
        self.model_size = Gauge("slimlm_model_size_bytes", "Bytes of weights and buffers.", registry=r)
        self.accel = None
        self.accel_peak = None
        try:
            import torch

            if torch.cuda.is_available():
                self.accel = Gauge("slimlm_accelerator_memory_bytes", "Accelerator memory allocated.", registry=r)
                self.accel.set_function(lambda: torch.cuda.memory_allocated() if torch.cuda.is_initialized() else 0)
                self.accel_peak = Gauge("slimlm_accelerator_peak_memory_bytes", "Peak accelerator memory allocated.",
                                        registry=r)
                self.accel_peak.set_function(
                    lambda: torch.cuda.max_memory_allocated() if torch.cuda.is_initialized() else 0)
        except ImportError:
            pass

    def bind(self, engine) -> None:
        self.running.set_function(lambda: engine.num_running)
        self.waiting.set_function(lambda: engine.num_waiting)

    # called from the engine thread
    def first_token(self, ttft_s: float, queue_s: float) -> None:
        self.ttft.observe(ttft_s)
        self.queue.observe(max(queue_s, 0.0))

    def inter_token(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def finished(self, req, reason: str, e2e_s: float) -> None:
        self.requests.labels(reason).inc()
        self.prompt_tokens.inc(len(req.prompt_ids))
        self.cached_prompt_tokens.inc(getattr(req, "cached_tokens", 0))
        self.generation_tokens.inc(len(req.output_ids))
        if reason in ("stop", "length"):
            self.e2e.observe(e2e_s)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
