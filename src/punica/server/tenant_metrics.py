"""Per-tenant metrics (the scheduling policy's tenants: adapters, or users with --tenant-from
user): requests waiting and running, tokens served, the fair policy's counter, and time in the
queue. Read from the scheduler at scrape time, except time in queue (observed at admission).

Labels are bounded like the adapters' (metrics.py): past `max_tenants` labelled tenants the rest
share "other"; the base model's tenant ("") is labelled "base"."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import GaugeMetricFamily

from punica.engine.scheduler import OTHER_TENANT, Scheduler
from punica.engine.sequence import Sequence

OTHER = "other"
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)


class TenantMetrics:
    def __init__(self, scheduler: Scheduler, registry: CollectorRegistry,
                 max_tenants: int = 256) -> None:
        self.scheduler, self.max_tenants = scheduler, max_tenants
        self._labels: set[str] = set()
        self.queue_time = Histogram("punica_tenant_queue_seconds",
                                    "Time a request waited in the queue before admission, by "
                                    "tenant", ["tenant"], buckets=QUEUE_BUCKETS,
                                    registry=registry)
        scheduler.on_admit = self._admitted
        registry.register(self)

    def label(self, tenant: str) -> str:
        if tenant == OTHER_TENANT:
            return OTHER
        if tenant in self._labels:
            return tenant or "base"
        if len(self._labels) >= self.max_tenants:
            return OTHER
        self._labels.add(tenant)
        return tenant or "base"

    def _admitted(self, seq: Sequence) -> None:
        wait = self.scheduler.clock() - seq.queued_at
        self.queue_time.labels(self.label(seq.tenant)).observe(max(0.0, wait))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        sched = self.scheduler  # snapshots first: the engine thread changes these meanwhile
        # (list() and dict() of a deque, list or dict copy them without running Python code)
        waiting, running = list(sched.waiting), list(sched.running)
        service = dict(sched.service)
        families = {
            "waiting": ("punica_tenant_requests_waiting", "Sequences waiting, by tenant",
                        Counter(s.tenant for s in waiting)),
            "running": ("punica_tenant_requests_running", "Sequences running, by tenant",
                        Counter(s.tenant for s in running)),
        }
        counters = getattr(sched.policy, "counters", None)
        if counters is not None:
            families["counter"] = ("punica_tenant_fair_counter", "The fair policy's weighted "
                                   "service counter of the tenant", dict(counters))
        tokens = GaugeMetricFamily("punica_tenant_service_tokens", "Tokens computed for the "
                                   "tenant, by kind (prompt, generated; cumulative)",
                                   labels=["tenant", "kind"])
        merged_tokens: Counter[tuple[str, str]] = Counter()
        for (tenant, kind), value in service.items():
            merged_tokens[self.label(tenant), kind] += value
        for (label, kind), value in sorted(merged_tokens.items()):
            tokens.add_metric([label, kind], float(value))
        yield tokens
        for name, doc, values in families.values():
            family = GaugeMetricFamily(name, doc, labels=["tenant"])
            merged: Counter[str] = Counter()
            for tenant, value in values.items():
                merged[self.label(tenant)] += value
            for label, value in sorted(merged.items()):
                family.add_metric([label], float(value))
            yield family
