"""Scheduling policies: which waiting sequence is offered admission next, which running one is
preempted under KV pressure, and (fair) how much service each tenant has had. Tensor-free.

- fcfs: the queue's order (a preempted sequence goes back to its front); preempt the newest.
- priority: the lowest `priority` value first, queue order among equals; preempt the highest
  value, the newest among equals.
- fair: the Virtual Token Counter (Sheng et al., "Fairness in Serving Large Language Models",
  OSDI 2024). Each tenant has a counter of the service it received: every prompt token computed
  counts `prefill_weight`, every decode token `decode_weight`, divided by the tenant's weight.
  The backlogged tenant (one with a waiting sequence) with the smallest counter is offered
  admission first (its oldest waiting sequence); under KV pressure the newest running sequence
  of the tenant with the largest counter is preempted. A tenant that arrives with nothing in the
  engine has its counter lifted to the smallest counter of the tenants that have something
  there, so an idle tenant cannot bank credit and then starve the others. Tokens recomputed after
  a preemption are not charged again (a high-water mark per sequence).

Life cycle the scheduler drives: arrived(seq) when queued the first time -> next(...) offers
it, possibly many times -> charge(scheduled) after each schedule -> finished(seq) once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from punica.engine.sequence import Sequence

POLICIES = ("fcfs", "priority", "fair")


class ScheduledLike(Protocol):
    seq: Sequence
    num_new_tokens: int
    start: int


def new_tokens(s: ScheduledLike, counted: int) -> tuple[int, int, int]:
    """(end, prompt, generated) of a scheduled chunk: the positions it computes past `counted`
    (a high-water mark: recomputation after a preemption is not new), split into prompt
    positions and generated tokens fed back."""
    end = s.start + s.num_new_tokens
    begin = max(s.start, counted)
    if end <= begin:
        return end, 0, 0
    prompt = max(0, min(end, len(s.seq.prompt_ids)) - begin)
    return end, prompt, end - begin - prompt


class SchedulingPolicy(Protocol):
    name: str

    def arrived(self, seq: Sequence) -> None: ...

    def next(self, waiting: Iterable[Sequence], skip: set[int]) -> Sequence | None:
        """The waiting sequence to offer admission now (none whose seq_id is in `skip`)."""

    def victim(self, running: list[Sequence]) -> Sequence:
        """The running sequence to preempt (`running` in admission order, not empty)."""

    def charge(self, scheduled: Iterable[ScheduledLike]) -> None: ...

    def finished(self, seq: Sequence) -> None: ...


class Fcfs:
    name = "fcfs"

    def arrived(self, seq: Sequence) -> None:
        pass

    def next(self, waiting: Iterable[Sequence], skip: set[int]) -> Sequence | None:
        return next((s for s in waiting if s.seq_id not in skip), None)

    def victim(self, running: list[Sequence]) -> Sequence:
        return running[-1]

    def charge(self, scheduled: Iterable[ScheduledLike]) -> None:
        pass

    def finished(self, seq: Sequence) -> None:
        pass


class Priority(Fcfs):
    name = "priority"

    def next(self, waiting: Iterable[Sequence], skip: set[int]) -> Sequence | None:
        best = None
        for s in waiting:  # the first of the lowest value: queue order among equals
            if s.seq_id not in skip and (best is None or s.priority < best.priority):
                best = s
        return best

    def victim(self, running: list[Sequence]) -> Sequence:
        worst = running[-1]
        for s in reversed(running):  # the newest of the highest value
            if s.priority > worst.priority:
                worst = s
        return worst


@dataclass
class Fair:
    """The Virtual Token Counter policy (module docstring)."""

    weights: Mapping[str, float] = field(default_factory=dict)
    """Tenant -> weight (> 0; 1 when absent): a tenant of weight 2 gets twice the service."""
    prefill_weight: float = 1.0
    decode_weight: float = 2.0
    """The paper's w_p and w_q: a decode token costs about twice a prompt token."""
    counters: dict[str, float] = field(default_factory=dict)
    live: Counter[str] = field(default_factory=Counter)
    """Tenant -> sequences in the engine (waiting or running)."""
    _charged: dict[int, int] = field(default_factory=dict)
    """seq_id -> positions charged so far (recomputation is free)."""
    name: str = "fair"

    def __post_init__(self) -> None:
        bad = {t: w for t, w in self.weights.items() if not w > 0}
        if bad:
            raise ValueError(f"tenant weights must be > 0, got {bad}")

    def arrived(self, seq: Sequence) -> None:
        t = seq.tenant
        if self.live[t] == 0:
            others = [self.counters.get(u, 0.0) for u, n in self.live.items() if n > 0]
            if others:  # the lift: no credit banked while away
                self.counters[t] = max(self.counters.get(t, 0.0), min(others))
        self.counters.setdefault(t, 0.0)
        self.live[t] += 1

    def next(self, waiting: Iterable[Sequence], skip: set[int]) -> Sequence | None:
        first: dict[str, Sequence] = {}
        for s in waiting:  # each tenant's oldest waiting sequence, in queue order
            if s.seq_id not in skip and s.tenant not in first:
                first[s.tenant] = s
        if not first:
            return None
        return min(first.values(), key=lambda s: self.counters.get(s.tenant, 0.0))

    def victim(self, running: list[Sequence]) -> Sequence:
        worst = running[-1]
        for s in reversed(running):  # the newest of the most-served tenant
            if self.counters.get(s.tenant, 0.0) > self.counters.get(worst.tenant, 0.0):
                worst = s
        return worst

    def charge(self, scheduled: Iterable[ScheduledLike]) -> None:
        for s in scheduled:
            seq = s.seq
            end, prefill, decode = new_tokens(s, self._charged.get(seq.seq_id, 0))
            if not prefill + decode:
                continue
            cost = prefill * self.prefill_weight + decode * self.decode_weight
            self.counters[seq.tenant] = self.counters.get(seq.tenant, 0.0) + \
                cost / self.weights.get(seq.tenant, 1.0)
            self._charged[seq.seq_id] = end

    def finished(self, seq: Sequence) -> None:
        self._charged.pop(seq.seq_id, None)
        if self.live[seq.tenant] > 0:
            self.live[seq.tenant] -= 1
        if self.live[seq.tenant] == 0:
            del self.live[seq.tenant]
            self._prune()

    def _prune(self) -> None:
        """Forget idle tenants whose counter is at most the least-served busy tenant's: the
        lift would raise them to at least that level on their return anyway (the minimum over
        busy tenants never falls while any is busy), so the state stays as small as the set of
        tenants that were served more than the others."""
        if not self.live:
            return
        floor = min(self.counters.get(t, 0.0) for t in self.live)
        for t in [t for t, c in self.counters.items() if t not in self.live and c <= floor]:
            del self.counters[t]


def make_policy(name: str, weights: Mapping[str, float] | None = None) -> SchedulingPolicy:
    if name == "fcfs":
        return Fcfs()
    if name == "priority":
        return Priority()
    if name == "fair":
        return Fair(dict(weights or {}))
    raise ValueError(f"scheduling policy: expected one of {POLICIES}, got {name!r}")
