"""Scheduler: chunked prefill, budgets, FCFS admission, preemption order, adapter slots.

Every scenario ends with all blocks and slots free.
"""

from __future__ import annotations

from punica.engine.block_manager import BlockManager
from punica.engine.sampling_params import SamplingParams
from punica.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from punica.engine.sequence import SeqStatus, Sequence
from punica.lora.slots import AdapterSlots


def make(num_blocks: int = 16, block_size: int = 4, max_seqs: int = 8, budget: int = 16,
         slots: int = 2) -> Scheduler:
    return Scheduler(SchedulerConfig(max_seqs, budget), BlockManager(num_blocks, block_size),
                     AdapterSlots(slots))


def seq(i: int, prompt_len: int, adapter: str | None = None) -> Sequence:
    return Sequence(i, f"r{i}", list(range(100, 100 + prompt_len)), SamplingParams(),
                    adapter)


def plan(out: SchedulerOutput) -> list[tuple[int, int]]:
    return [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled]


def step(sched: Scheduler, token: int = 7) -> SchedulerOutput:
    """Schedule, pretend the model ran, append a token to every sequence that samples."""
    out = sched.schedule()
    samplers = [s.seq for s in out.scheduled if s.samples]
    sched.advance(out)
    for s in samplers:
        s.output_ids.append(token)
    return out


def finish_all(sched: Scheduler) -> None:
    for s in list(sched.running) + list(sched.waiting):
        sched.finish(s, "stop")
    assert sched.blocks.num_free == sched.blocks.num_blocks
    assert sched.slots.pinned() == {}


def test_chunked_prefill_shares_the_budget_with_decodes() -> None:
    sched = make(budget=10)
    sched.add(seq(1, 6))
    sched.add(seq(2, 12))
    out = step(sched)
    assert plan(out) == [(1, 6), (2, 4)]  # seq 2 gets the 4 tokens left: a chunk
    assert [s.samples for s in out.scheduled] == [True, False]
    out = step(sched)
    assert plan(out) == [(1, 1), (2, 8)]  # decode of 1 first, the rest of 2's prompt
    assert sched.blocks.block_table(1) == [0, 1]
    assert sched.blocks.block_table(2) == [2, 3, 4]
    out = step(sched)
    assert plan(out) == [(1, 1), (2, 1)]
    finish_all(sched)


def test_max_num_seqs_and_fcfs_admission() -> None:
    sched = make(max_seqs=2, budget=100)
    for i in range(1, 4):
        sched.add(seq(i, 3))
    assert plan(step(sched)) == [(1, 3), (2, 3)]
    assert [s.seq_id for s in sched.waiting] == [3]
    sched.finish(sched.running[0], "stop")
    assert plan(step(sched)) == [(2, 1), (3, 3)]
    finish_all(sched)


def test_preempts_newest_first_and_recomputes_it_later() -> None:
    sched = make(num_blocks=4, block_size=2, budget=100)
    sched.add(seq(1, 4))  # 2 blocks
    sched.add(seq(2, 4))  # 2 blocks: pool full
    assert plan(step(sched)) == [(1, 4), (2, 4)]
    out = step(sched)  # seq 1 needs a 3rd block for its 5th token: seq 2 is preempted
    assert [s.seq_id for s in out.preempted] == [2]
    assert plan(out) == [(1, 1)]
    s2 = sched.waiting[0]
    assert s2.seq_id == 2 and s2.num_computed == 0 and s2.output_ids == [7]
    assert sched.blocks.block_table(1) == [0, 1, 2]
    sched.finish(sched.running[0], "stop")
    out = step(sched)
    assert plan(out) == [(2, 5)]  # prompt + its one output recomputed
    finish_all(sched)


def test_a_sequence_preempts_itself_when_it_is_the_newest() -> None:
    sched = make(num_blocks=2, block_size=2, budget=100)
    sched.add(seq(1, 4))
    step(sched)
    out = step(sched)
    assert [s.seq_id for s in out.preempted] == [1] and plan(out) == []
    assert sched.blocks.num_free == 2
    finish_all(sched)


def test_adapter_slots_gate_admission_and_are_released() -> None:
    sched = make(slots=1, budget=100)
    sched.add(seq(1, 2, "a"))
    sched.add(seq(2, 2, "b"))
    sched.add(seq(3, 2, None))
    out = step(sched)
    assert plan(out) == [(1, 2)]  # b waits for the only slot; FCFS keeps 3 behind it
    assert out.loads == [(0, "a")]
    assert sched.running[0].slot == 0
    sched.finish(sched.running[0], "stop")
    out = step(sched)
    assert plan(out) == [(2, 2), (3, 2)]
    assert out.loads == [(0, "b")]
    assert [s.slot for s in sched.running] == [0, -1]
    finish_all(sched)


def test_same_adapter_shares_a_slot_without_reload() -> None:
    sched = make(slots=1, budget=100)
    sched.add(seq(1, 2, "a"))
    sched.add(seq(2, 2, "a"))
    out = step(sched)
    assert plan(out) == [(1, 2), (2, 2)] and out.loads == [(0, "a")]
    assert sched.slots.refcount("a") == 2
    finish_all(sched)


def test_finish_a_waiting_sequence() -> None:
    sched = make()
    s = seq(1, 3)
    sched.add(s)
    sched.finish(s, "abort")
    assert s.status is SeqStatus.FINISHED and s.finish_reason == "abort"
    assert not sched.has_work()


def test_requests_whose_adapter_is_being_read_wait_without_holding_anything() -> None:
    """ready(adapter) false: the request stays queued in place, holding no block and no slot;
    the requests behind it are admitted (FCFS among the ready); once ready it is admitted."""
    ready = {"cold": False, "warm": True}
    asked: list[str] = []

    def is_ready(name: str) -> bool:
        asked.append(name)
        return ready[name]

    sched = Scheduler(SchedulerConfig(8, 16), BlockManager(16, 4), AdapterSlots(2), is_ready)
    sched.add(seq(1, 4, "cold"))
    sched.add(seq(2, 4, "warm"))
    sched.add(seq(3, 4))
    out = step(sched)
    assert plan(out) == [(2, 4), (3, 4)] and out.loads == [(0, "warm")]
    assert [s.seq_id for s in sched.waiting] == [1] and sched.waiting[0].slot == -1
    assert sched.blocks.num_free == 16 - 2 and sched.slots.pinned() == {"warm": 1}
    assert asked == ["cold", "warm"]
    ready["cold"] = True
    out = step(sched)
    assert plan(out) == [(2, 1), (3, 1), (1, 4)] and out.loads == [(1, "cold")]
    assert not sched.waiting
    finish_all(sched)


def test_a_ready_request_that_does_not_fit_still_stops_admission() -> None:
    """Only requests waiting for their adapter's files are passed over: a ready one that does
    not fit keeps strict FCFS for those behind it, and the passed-over stay in order."""
    sched = Scheduler(SchedulerConfig(8, 16), BlockManager(3, 4), AdapterSlots(2),
                      lambda name: name != "cold")
    sched.add(seq(1, 4, "cold"))
    sched.add(seq(2, 16))  # needs 4 blocks of 3: never fits now
    sched.add(seq(3, 4, "cold"))
    sched.add(seq(4, 4))
    out = step(sched)
    assert plan(out) == [] and [s.seq_id for s in sched.waiting] == [1, 2, 3, 4]
    assert sched.blocks.num_free == 3
    finish_all(sched)
