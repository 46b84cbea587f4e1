"""Scheduling policies (engine/policy.py) on hand-made queues, and through the scheduler."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from punica.engine.block_manager import BlockManager
from punica.engine.policy import Fair, Fcfs, Priority, make_policy
from punica.engine.sampling_params import SamplingParams
from punica.engine.scheduler import Scheduler, SchedulerConfig
from punica.engine.sequence import Sequence
from punica.lora.slots import AdapterSlots


def seq(i: int, tenant: str = "", priority: int = 0, prompt_len: int = 4) -> Sequence:
    return Sequence(i, f"r{i}", list(range(1, 1 + prompt_len)), SamplingParams(), None,
                    tenant=tenant, priority=priority)


@dataclass
class Sched:  # a ScheduledSeq's fields the policies read
    seq: Sequence
    num_new_tokens: int
    start: int


def ids(xs: list[Sequence]) -> list[int]:
    return [s.seq_id for s in xs]


def drain(policy: object, waiting: list[Sequence], skip: set[int] | None = None) -> list[int]:
    """The order `next` offers the queue in, each admitted (removed) when offered."""
    waiting, order = list(waiting), []
    while (s := policy.next(waiting, skip or set())) is not None:
        order.append(s.seq_id)
        waiting.remove(s)
    return order


def test_fcfs_is_queue_order_and_preempts_the_newest() -> None:
    q = [seq(3), seq(1), seq(2)]
    assert drain(Fcfs(), q) == [3, 1, 2] and drain(Fcfs(), q, {1}) == [3, 2]
    assert Fcfs().victim(q).seq_id == 2


def test_priority_lowest_value_first_queue_order_among_equals() -> None:
    q = [seq(0, priority=5), seq(1, priority=1), seq(2, priority=5), seq(3, priority=-2),
         seq(4, priority=1)]
    assert drain(Priority(), q) == [3, 1, 4, 0, 2]
    assert drain(Priority(), q, {3, 4}) == [1, 0, 2]
    running = [seq(10, priority=1), seq(11, priority=7), seq(12, priority=7), seq(13)]
    assert Priority().victim(running).seq_id == 12  # the highest value, the newest of those


def test_fair_charges_weighted_tokens_and_admits_the_least_served() -> None:
    fair = Fair({"b": 2.0})
    a1, a2, b1 = seq(0, "a", prompt_len=10), seq(1, "a", prompt_len=10), seq(2, "b", prompt_len=10)
    for s in (a1, a2, b1):
        fair.arrived(s)
    assert fair.counters == {"a": 0.0, "b": 0.0} and dict(fair.live) == {"a": 2, "b": 1}
    fair.charge([Sched(a1, 10, 0)])  # a1's prompt: 10 prefill tokens
    assert fair.counters == {"a": 10.0, "b": 0.0}
    assert fair.next([a2, b1], set()) is b1  # b is less served, though a2 came first
    fair.charge([Sched(b1, 10, 0), Sched(a1, 1, 10)])  # b's prompt at weight 2; a1 decodes
    assert fair.counters == {"a": 12.0, "b": 5.0}
    fair.charge([Sched(b1, 1, 10), Sched(b1, 1, 11)])  # decode tokens weigh 2, halved for b
    assert fair.counters == {"a": 12.0, "b": 7.0}
    assert fair.victim([a1, b1]) is a1  # the most served tenant's


def test_fair_does_not_charge_recomputation_after_preemption() -> None:
    fair = Fair()
    s = seq(0, "a", prompt_len=6)
    fair.arrived(s)
    fair.charge([Sched(s, 6, 0), Sched(s, 1, 6)])
    assert fair.counters["a"] == 8.0
    fair.charge([Sched(s, 7, 0)])  # preempted, recomputed: prompt + its output again
    assert fair.counters["a"] == 8.0
    fair.charge([Sched(s, 1, 7)])  # then its next decode token
    assert fair.counters["a"] == 10.0


def test_fair_lifts_an_arriving_tenant_to_the_least_served_backlogged_one() -> None:
    fair = Fair()
    a, b = seq(0, "a"), seq(1, "b")
    fair.arrived(a)
    fair.arrived(b)
    fair.charge([Sched(a, 4, 0)] + [Sched(b, 4, 0)] + [Sched(b, 1, k) for k in range(4, 8)])
    assert fair.counters == {"a": 4.0, "b": 12.0}
    fair.arrived(c := seq(2, "c"))  # new: starts at a's 4, not at 0
    assert fair.counters["c"] == 4.0
    fair.finished(a)
    fair.finished(c)
    assert dict(fair.live) == {"b": 1}
    assert fair.counters == {"b": 12.0}  # a and c, idle at or below b, are forgotten
    fair.arrived(seq(3, "a"))  # back after being idle: lifted to b's 12 (its 4 was banked)
    assert fair.counters["a"] == 12.0
    fair.finished(b)
    fair.arrived(seq(4, "c"))  # only a is backlogged: c goes up to a's level
    assert fair.counters["c"] == 12.0


def test_fair_skips_and_ties() -> None:
    fair = Fair()
    q = [seq(0, "a"), seq(1, "a"), seq(2, "b"), seq(3, "c")]
    for s in q:
        fair.arrived(s)
    assert fair.next(q, set()) is q[0]  # all at 0: the queue's first
    assert fair.next(q, {0}) is q[1]  # a's oldest not passed over
    assert fair.next(q, {0, 1, 2, 3}) is None


def test_make_policy_and_weights_are_checked() -> None:
    assert [make_policy(n).name for n in ("fcfs", "priority", "fair")] == \
        ["fcfs", "priority", "fair"]
    with pytest.raises(ValueError, match="expected one of"):
        make_policy("lifo")
    with pytest.raises(ValueError, match="> 0"):
        Fair({"a": 0.0})
    with pytest.raises(ValueError, match="policy"):
        SchedulerConfig(policy="lifo")


def run(sched: Scheduler, steps: int) -> list[int]:
    """Step the scheduler (every sampled sequence gets a token; a sequence ends after 2 output
    tokens); the seq_ids in the order they finished."""
    done = []
    for _ in range(steps):
        out = sched.schedule()
        sched.advance(out)
        for s in out.scheduled:
            if s.samples:
                s.seq.output_ids.append(7)
                if len(s.seq.output_ids) == 2:
                    sched.finish(s.seq, "length")
                    done.append(s.seq.seq_id)
    return done


@pytest.mark.parametrize("policy", ["fcfs", "fair"])
def test_a_flood_does_not_hold_back_another_tenant_under_fair(policy: str) -> None:
    """Tenant a queues 12 requests, then b queues 2; two run at a time. FCFS serves a's whole
    backlog first; fair alternates, so b's requests finish among the first."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64, policy=policy),
                      BlockManager(64, 4), AdapterSlots(1))
    for i in range(12):
        sched.add(seq(i, "a"))
    for i in (12, 13):
        sched.add(seq(i, "b"))
    done = run(sched, 60)
    assert sorted(done) == list(range(14))
    b_last = max(done.index(12), done.index(13))
    if policy == "fcfs":
        assert done[-2:] == [12, 13]
    else:
        assert b_last <= 3, done
    assert sched.blocks.num_free == 64


def test_preemption_takes_from_the_most_served_tenant() -> None:
    """KV for 3 blocks of 4 tokens: a (served most) loses its newest sequence, not b."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64,
                                      policy="fair"), BlockManager(3, 4), AdapterSlots(1))
    a0, a1, b0 = seq(0, "a", prompt_len=4), seq(1, "a", prompt_len=3), seq(2, "b", prompt_len=3)
    for s in (a0, a1, b0):
        sched.add(s)
    out = sched.schedule()  # a0 (4 tokens: one block), a1 and b0 (3 each): all three blocks
    assert ids([s.seq for s in out.scheduled]) == [0, 2, 1]  # a0, then b (less served), a1
    sched.advance(out)
    for s in out.scheduled:
        s.seq.output_ids.append(7)
    out = sched.schedule()  # a0 needs a second block: a (served 7 tokens to b's 3) gives one
    assert ids(out.preempted) == [1] and sched.policy.counters["a"] > sched.policy.counters["b"]
    for s in list(sched.running) + list(sched.waiting):
        sched.finish(s, "stop")
    assert sched.blocks.num_free == 3 and dict(sched.policy.live) == {}


def test_service_and_time_in_queue_are_counted_per_tenant() -> None:
    """The scheduler counts every computed token for its tenant and reports each admission
    with the time it queued (a clock set by the test)."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64),
                      BlockManager(16, 4), AdapterSlots(1))
    now = [10.0]
    sched.clock = lambda: now[0]
    admitted: list[tuple[int, float]] = []
    sched.on_admit = lambda s: admitted.append((s.seq_id, now[0] - s.queued_at))
    sched.add(seq(0, "a", prompt_len=5))
    now[0] = 11.0
    sched.add(seq(1, "b", prompt_len=3))
    now[0] = 12.5
    done = run(sched, 6)
    assert done == [0, 1]
    assert admitted == [(0, 2.5), (1, 1.5)]  # b queued at 11, admitted at 12.5
    assert dict(sched.service) == {("a", "prompt"): 5, ("a", "generated"): 1,
                                   ("b", "prompt"): 3, ("b", "generated"): 1}


def low_first_after_one_token(low_prompt: int, high_prompt: int) -> tuple[Scheduler, Sequence,
                                                                          Sequence]:
    """priority, 2 blocks of 4 tokens: low (value 9) and high (value 0) admitted (high first)
    and given one token each, then low put first in the running list."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64,
                                      policy="priority"), BlockManager(2, 4), AdapterSlots(1))
    low, high = seq(0, priority=9, prompt_len=low_prompt), seq(1, priority=0,
                                                                prompt_len=high_prompt)
    sched.add(low)
    sched.add(high)
    out = sched.schedule()
    assert ids([s.seq for s in out.scheduled]) == [1, 0]  # by priority: high first
    sched.advance(out)
    for s in (low, high):
        s.output_ids.append(7)
    sched.running.reverse()
    return sched, low, high


def test_a_victim_scheduled_earlier_in_the_step_leaves_it() -> None:
    """low decodes within its block; high needs a second block: low is preempted although it
    was scheduled first in this step, and its token goes back to the budget."""
    sched, low, high = low_first_after_one_token(low_prompt=3, high_prompt=4)
    out = sched.schedule()
    assert ids(out.preempted) == [0] and ids([s.seq for s in out.scheduled]) == [1]
    assert out.num_tokens == 1 and sched.waiting[0] is low and sched.blocks.num_free == 0
    sched.finish(high, "stop")
    sched.finish(low, "stop")
    assert sched.blocks.num_free == 2


def test_a_sequence_that_preempts_itself_leaves_the_rest_scheduled() -> None:
    """low needs a block and is itself the policy's victim; high, after it in the running
    list, is still scheduled in the same step."""
    sched, low, high = low_first_after_one_token(low_prompt=4, high_prompt=3)
    out = sched.schedule()
    assert ids(out.preempted) == [0] and ids([s.seq for s in out.scheduled]) == [1]
    sched.finish(high, "stop")
    sched.finish(low, "stop")
    assert sched.blocks.num_free == 2


def test_service_counts_recomputation_once_and_caps_tenants(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from punica.engine import scheduler as scheduler_module

    sched = Scheduler(SchedulerConfig(), BlockManager(4, 4), AdapterSlots(1))
    s = seq(0, "a", prompt_len=4)
    sched._count_service([Sched(s, 4, 0), Sched(s, 1, 4)])
    sched._count_service([Sched(s, 5, 0)])  # preempted and recomputed: nothing new
    sched._count_service([Sched(s, 1, 5)])
    assert dict(sched.service) == {("a", "prompt"): 4, ("a", "generated"): 2}
    monkeypatch.setattr(scheduler_module, "MAX_TENANTS", 2)
    for k, t in enumerate(("b", "c", "d")):
        sched._count_service([Sched(seq(k + 1, t, prompt_len=2), 2, 0)])
    assert {k[0] for k in sched.service} == {"a", "b", scheduler_module.OTHER_TENANT}
    assert sched.service[scheduler_module.OTHER_TENANT, "prompt"] == 4
