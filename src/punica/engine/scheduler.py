"""Tensor-free continuous-batching scheduler: chunked prefill under one token budget, a
scheduling policy (engine/policy.py: fcfs, priority or fair) for admission and preemption,
preemption by recomputation, admission gated by KV blocks, adapter slots and the adapter's
weights being in host memory.

Each step: running sequences first, oldest first, each taking what it still needs (1 token for a
decode, the rest of its prompt or a chunk of it for a prefill) within `max_num_batched_tokens`;
when blocks run out the policy's victim among those not yet scheduled this step is preempted
(fcfs: the newest; blocks freed, adapter released, recomputed later from the front of the
queue). Then waiting sequences are admitted in the policy's order while the budget,
`max_num_seqs`, free blocks and an adapter slot allow; the first that does not fit stops
admission (no request is overtaken by one after it in the policy's order, except by those behind
one whose adapter is still being read from disk, which waits without holding anything). A
sequence's adapter slot is pinned from admission to finish/preemption, so the pool never evicts
an adapter a running request uses.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from punica.engine.block_manager import BlockManager
from punica.engine.policy import POLICIES, make_policy, new_tokens
from punica.engine.sequence import SeqStatus, Sequence
from punica.lora.slots import AdapterSlots

MAX_TENANTS = 4096
"""Tenants `Scheduler.service` keeps apart (tenants may be client-chosen `user` strings)."""
OTHER_TENANT = "\0other"
"""Where the service of tenants past MAX_TENANTS is counted."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    """Most sequences running at once."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step (prefill chunks + decodes)."""
    async_scheduling: bool = True
    """Schedule and launch step k+1 while step k still runs on the device (engine/inflight.py);
    requests with penalties fall back to synchronous steps. On the H200 it took textgen from
    1,804 to 2,418 tok/s (cap 32, Distinct; RESULTS.md)."""
    policy: str = "fcfs"
    """Who is admitted first and preempted first: fcfs, priority or fair (engine/policy.py)."""
    tenant_weights: tuple[tuple[str, float], ...] = ()
    """fair: (tenant, weight) pairs; a tenant not listed weighs 1."""

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens: expected >= 1, got "
                             f"{self.max_num_seqs}, {self.max_num_batched_tokens}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy: expected one of {POLICIES}, got {self.policy!r}")


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    """Tokens computed this step: positions start .. start + num_new_tokens."""
    start: int
    """seq.num_computed when scheduled."""
    samples: bool
    """True when this chunk reaches the sequence's last token: a token is sampled."""

    @classmethod
    def of(cls, seq: Sequence, num_new_tokens: int) -> ScheduledSeq:
        samples = seq.num_computed + num_new_tokens == seq.num_tokens
        return cls(seq, num_new_tokens, seq.num_computed, samples)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    loads: list[tuple[int, str]] = field(default_factory=list)
    """(slot, adapter): weights to copy into the pool before this step runs."""
    preempted: list[Sequence] = field(default_factory=list)
    evicted: list[str] = field(default_factory=list)
    """Adapters pushed out of the pool to make room for this step's loads."""

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager,
                 slots: AdapterSlots, ready: Callable[[str], bool] | None = None) -> None:
        self.config = config
        self.blocks = blocks
        self.slots = slots
        self.ready = ready
        """ready(adapter): whether its weights are in host memory (lora/registry.py); a request
        whose adapter is not stays queued, holding nothing, and the requests behind it go on."""
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.policy = make_policy(config.policy, dict(config.tenant_weights))
        self.clock: Callable[[], float] = time.perf_counter
        self.service: Counter[tuple[str, str]] = Counter()
        """Tokens served per (tenant, "prompt" | "generated"): positions of the prompt, and of
        generated tokens fed back; recomputation after a preemption is not counted again. Past
        MAX_TENANTS tenants the others are counted as OTHER_TENANT."""
        self._served: dict[int, int] = {}  # seq_id -> positions counted in `service`
        self.on_admit: Callable[[Sequence], None] | None = None
        """Called with each sequence admitted (its queued_at still set: time in queue)."""

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        seq.queued_at = self.clock()
        self.waiting.append(seq)
        self.policy.arrived(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        self.policy.charge(out.scheduled)  # the running ones' tokens, before admission
        if not out.preempted:
            self._admit_waiting(out, budget)
        self._count_service(out.scheduled)
        return out

    def _count_service(self, scheduled: list[ScheduledSeq]) -> None:
        for s in scheduled:
            end, prompt, generated = new_tokens(s, self._served.get(s.seq.seq_id, 0))
            if not prompt + generated:
                continue
            self._served[s.seq.seq_id] = end
            tenant = s.seq.tenant
            if (tenant, "prompt") not in self.service and \
                    len(self.service) >= 2 * MAX_TENANTS:
                tenant = OTHER_TENANT
            self.service[tenant, "prompt"] += prompt
            self.service[tenant, "generated"] += generated

    def _schedule_running(self, out: SchedulerOutput, total: int) -> int:
        """Schedule the running sequences within `total` tokens (out.scheduled starts empty);
        returns the budget left."""
        i, budget = 0, total
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            if n == 0:  # its next token is still being sampled (async scheduling): skip
                i += 1
                continue
            victims = len(out.preempted)
            if not self._make_room(out, seq, n):
                continue  # seq itself was the victim: running[i] is the next one now
            if len(out.preempted) > victims:
                i = self.running.index(seq)  # victims before it may have left the list
            self.blocks.allocate(seq.seq_id, seq.num_computed + n)
            out.scheduled.append(ScheduledSeq.of(seq, n))
            budget = total - out.num_tokens  # (a victim's tokens came back)
            i += 1
        return budget

    def _make_room(self, out: SchedulerOutput, seq: Sequence, n: int) -> bool:
        """Preempt the policy's victims (any running sequence) until `seq` can take `n` more
        tokens; False when seq itself was preempted. A victim scheduled earlier in this step
        leaves the step (its tokens go back to the budget)."""
        while not self.blocks.can_allocate(seq.seq_id, seq.num_computed + n):
            victim = self.policy.victim(self.running)
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
            out.scheduled = [s for s in out.scheduled if s.seq is not victim]
        return True

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        """In the policy's order among the requests whose adapter is ready: the first of those
        that does not fit stops admission; those whose adapter is still being read are passed
        over (they keep their place)."""
        skip: set[int] = set()
        while budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.policy.next(self.waiting, skip)
            if seq is None:
                break
            if seq.adapter is not None and self.ready is not None and \
                    not self.ready(seq.adapter):
                skip.add(seq.seq_id)
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self.blocks.can_allocate(seq.seq_id, seq.num_computed + n):
                break
            if seq.adapter is not None:
                acquired = self.slots.acquire(seq.adapter)
                if acquired is None:
                    break  # every slot pinned by running requests: wait for one to finish
                seq.slot = acquired.slot
                if acquired.needs_load:
                    out.loads.append((acquired.slot, seq.adapter))
                if acquired.evicted is not None:
                    out.evicted.append(acquired.evicted)
            self.waiting.remove(seq)
            self.blocks.allocate(seq.seq_id, seq.num_computed + n)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            if self.on_admit is not None:
                self.on_admit(seq)
            out.scheduled.append(ScheduledSeq.of(seq, n))
            self.policy.charge(out.scheduled[-1:])  # counted now: the next pick sees it
            budget -= n

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        seq.queued_at = self.clock()
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.seq_id)
        if seq.adapter is not None and seq.slot >= 0:
            self.slots.release(seq.adapter)
        seq.slot = -1

    def advance(self, out: SchedulerOutput) -> None:
        """After the step ran: the scheduled tokens now have their KV in the cache."""
        for s in out.scheduled:
            s.seq.num_computed += s.num_new_tokens

    def finish(self, seq: Sequence, reason: str) -> None:
        """Stop a running or waiting sequence: free its blocks and its adapter slot."""
        if seq.status is not SeqStatus.FINISHED:
            self.policy.finished(seq)
            self._served.pop(seq.seq_id, None)
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        elif seq.status is SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
