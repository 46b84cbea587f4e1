"""Prometheus metrics of the server: per-adapter request counters and latency histograms, and
engine gauges read at scrape time (queue, running, KV blocks, adapter slots, loads, evictions).

Labels are bounded: an adapter label is a registered adapter's validated name, unloading an
adapter drops its series, and past `max_adapters` labelled adapters the rest share "other"."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from punica.engine.llm_engine import LLMEngine
from punica.server.tenant_metrics import TenantMetrics

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


OTHER = "other"
"""The label of adapters past Metrics.max_adapters."""


class Metrics:
    def __init__(self, engine: LLMEngine, max_adapters: int = 256) -> None:
        self.max_adapters = max_adapters
        self._labels: set[str] = set()
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
        self.adapter_load = Histogram(
            "punica_adapter_load_seconds", "Adapter loads by the tier they come from: disk (a "
            "read into host memory, on a loader thread) and host (queueing a GPU slot fill on "
            "the engine thread)", ["tier"], buckets=LOAD_BUCKETS, registry=r)
        engine.on_adapter_load = lambda tier, s: self.adapter_load.labels(tier).observe(s)
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
            "punica_adapter_failures": ("Adapters that failed in use (cumulative)",
                                        lambda: engine.stats.get("adapter_failures", 0)),
            "punica_step_failures": ("Engine steps that raised (cumulative)",
                                     lambda: engine.stats.get("step_failures", 0)),
        }
        reg = engine.registry  # the host tier: parsed adapters in host memory (the seconds
        # of its reads: punica_adapter_load_seconds{tier="disk"}, a histogram)
        for key, doc in (("host_hits", "Adapter slot fills served from host memory"),
                         ("host_misses", "Adapters read from disk because host memory lacked "
                          "them"),
                         ("disk_loads", "Adapter reads from disk that succeeded"),
                         ("load_failures", "Adapter reads from disk that failed"),
                         ("host_evictions", "Adapters evicted from host memory")):
            gauges[f"punica_adapter_{key}"] = (f"{doc} (cumulative)",
                                               lambda key=key: reg.stats[key])
        gauges["punica_adapter_host_resident"] = ("Adapters parsed in host memory",
                                                  lambda: len(reg.cached()))
        gauges["punica_adapter_host_bytes"] = ("Host bytes of the parsed adapters",
                                               lambda: reg.cached_bytes)
        gauges["punica_adapter_reads_in_flight"] = ("Adapters being read from disk",
                                                    lambda: len(reg.loading()))
        arena = engine.arena
        if arena is not None:
            gauges["punica_adapter_pinned_bytes"] = ("Pinned arena bytes holding adapters",
                                                     lambda: arena.ranges.used)
            gauges["punica_adapter_pinned_fallbacks"] = (
                "Adapter tensors read into pageable memory, the pinned arena full (cumulative)",
                lambda: arena.fallbacks)
        for name, (doc, fn) in gauges.items():
            Gauge(name, doc, registry=r).set_function(fn)
        self.tenants = TenantMetrics(sched, r)

    def observe(self, adapter: str | None, prompt_tokens: int, generated: int,
                reason: str | None, ttft: float | None, tpot: float | None) -> None:
        label = self._label(adapter)
        self.requests.labels(label, reason or "abort").inc()
        self.prompt_tokens.labels(label).inc(prompt_tokens)
        self.generation_tokens.labels(label).inc(generated)
        if ttft is not None:
            self.ttft.labels(label).observe(ttft)
        if tpot is not None:
            self.tpot.labels(label).observe(tpot)

    def _label(self, adapter: str | None) -> str:
        if adapter is None:
            return "base"
        if adapter not in self._labels:
            if len(self._labels) >= self.max_adapters:
                return OTHER
            self._labels.add(adapter)
        return adapter

    def forget(self, adapter: str) -> None:
        """Drop an unloaded adapter's series (its label is free again)."""
        if adapter not in self._labels:
            return
        self._labels.discard(adapter)
        for metric in (self.prompt_tokens, self.generation_tokens, self.ttft, self.tpot):
            try:
                metric.remove(adapter)
            except KeyError:
                pass
        for labels in list(self.requests._metrics):  # (adapter, reason) pairs
            if labels[0] == adapter:
                self.requests.remove(*labels)

    def render(self) -> bytes:
        return generate_latest(self.registry)
