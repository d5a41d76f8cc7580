"""Prometheus metrics of one server (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .engine import EngineMetrics, Sequence

# 1 ms .. ~70 s, each bucket 25% wider than the one before: quantiles from them are within ~12%
LATENCY_BUCKETS = tuple(round(0.001 * 1.25 ** i, 6) for i in range(51))


class ServerMetrics(EngineMetrics):
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("vlmdeploy_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("vlmdeploy_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generated_tokens = Counter("vlmdeploy_generated_tokens", "Tokens generated (rate() = tokens/s)", registry=r)
        self.ttft = Histogram("vlmdeploy_time_to_first_token_seconds", "Request arrival to first token (images, queue, prefill)",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.token_latency = Histogram("vlmdeploy_time_per_output_token_seconds", "Time between a row's tokens",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.queue_length = Gauge("vlmdeploy_queue_length", "Requests waiting for a KV slot", registry=r)
        self.running_rows = Gauge("vlmdeploy_running_rows", "Rows in the running batch (= KV slots in use)", registry=r)
        self.kv_slots = Gauge("vlmdeploy_kv_slots_total", "KV slots (--max-num-seqs)", registry=r)
        self.vision_hits = Gauge("vlmdeploy_vision_cache_hits", "Images whose encoder output came from the cache", registry=r)
        self.vision_misses = Gauge("vlmdeploy_vision_cache_misses", "Images encoded (not in the cache)", registry=r)
        self.vision_bytes = Gauge("vlmdeploy_vision_cache_bytes", "Bytes of cached encoder outputs", registry=r)
        self.vision_entries = Gauge("vlmdeploy_vision_cache_entries", "Cached images", registry=r)

    def watch(self, engine, vision_cache) -> None:
        """Gauges read the engine and the cache when /metrics is scraped."""
        self.queue_length.set_function(lambda: engine.queue_length)
        self.running_rows.set_function(lambda: engine.slots_in_use)
        self.kv_slots.set(engine.cache.slots)
        self.vision_hits.set_function(lambda: vision_cache.hits)
        self.vision_misses.set_function(lambda: vision_cache.misses)
        self.vision_bytes.set_function(lambda: vision_cache.bytes)
        self.vision_entries.set_function(lambda: len(vision_cache))

    # EngineMetrics hooks (scheduler thread)
    def first_token(self, seq: Sequence, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.prompt_tokens.inc(seq.prompt.prompt_tokens)
        self.generated_tokens.inc()

    def next_token(self, seconds: float) -> None:
        self.token_latency.observe(seconds)
        self.generated_tokens.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
