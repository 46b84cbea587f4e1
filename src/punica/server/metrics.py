"""Prometheus metrics of the server: per-adapter request counters and latency histograms, and
engine gauges read at scrape time (queue, running, KV blocks, adapter slots, loads, evictions)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from punica.engine.llm_engine import LLMEngine

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, engine: LLMEngine) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("punica_requests", "Finished requests", ["adapter", "reason"],
                                registry=r)
        self.prompt_tokens = Counter("punica_prompt_tokens", "Prompt tokens", ["adapter"],
                                     registry=r)
        self.generation_tokens = Counter("punica_generation_tokens", "Generated tokens",
                                         ["adapter"], registry=r)
        self.ttft = Histogram("punica_time_to_first_token_seconds", "Time to first token",
                              ["adapter"], buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("punica_time_per_output_token_seconds",
                              "Time per output token after the first", ["adapter"],
                              buckets=LATENCY_BUCKETS, registry=r)
        sched = engine.scheduler
        gauges = {
            "punica_requests_waiting": ("Sequences waiting", lambda: len(sched.waiting)),
            "punica_requests_running": ("Sequences running", lambda: len(sched.running)),
            "punica_kv_blocks_total": ("KV blocks", lambda: sched.blocks.num_blocks),
            "punica_kv_blocks_used": ("KV blocks in use",
                                      lambda: sched.blocks.num_blocks - sched.blocks.num_free),
            "punica_adapter_slots_total": ("Adapter slots", lambda: engine.slots.num_slots),
            "punica_adapter_slots_resident": ("Adapter slots holding an adapter",
                                              lambda: len(engine.slots.resident())),
            "punica_adapter_slots_pinned": ("Adapter slots used by running requests",
                                            lambda: len(engine.slots.pinned())),
            "punica_adapter_loads": ("Adapter copies into the pool (cumulative)",
                                     lambda: engine.stats["adapter_loads"]),
            "punica_adapter_evictions": ("Adapters evicted from the pool (cumulative)",
                                         lambda: engine.stats["adapter_evictions"]),
        }
        for name, (doc, fn) in gauges.items():
            Gauge(name, doc, registry=r).set_function(fn)

    def observe(self, adapter: str | None, prompt_tokens: int, generated: int,
                reason: str | None, ttft: float | None, tpot: float | None) -> None:
        label = adapter or "base"
        self.requests.labels(label, reason or "abort").inc()
        self.prompt_tokens.labels(label).inc(prompt_tokens)
        self.generation_tokens.labels(label).inc(generated)
        if ttft is not None:
            self.ttft.labels(label).observe(ttft)
        if tpot is not None:
            self.tpot.labels(label).observe(tpot)

    def render(self) -> bytes:
        return generate_latest(self.registry)
