"""The bandwidth floor of a text-generation run: the engine's own (tensor-free) scheduler replayed
over the workload without a model, each step charged the bytes it must read at least:

    floor_s = sum over steps (weights + the step's distinct adapters + the KV of every context
                              token it attends to) / copy bandwidth

the same per-step floor as `punica bench decode`. Greedy requests with ignore_eos stop exactly at
their max_tokens, so the replay schedules exactly the steps a synchronous engine runs (tests check
the step count against the engine's StepStats); async steps add at most one per request (a request
whose last token is still in flight rides along one more step). Prompt FLOPs are left out: the
workload's prompts are short.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from punica.engine.block_manager import BlockManager
from punica.engine.sampling_params import SamplingParams
from punica.engine.scheduler import Scheduler, SchedulerConfig
from punica.engine.sequence import Sequence
from punica.lora.slots import AdapterSlots


@dataclass(frozen=True)
class Replay:
    steps: int
    adapter_reads: int
    """Sum over steps of the distinct adapters in the step."""
    kv_tokens: int
    """Sum over steps of the context tokens attended to (prompt and output so far)."""
    tokens: int
    """Prompt + output tokens of the whole run."""


def replay(requests: list[tuple[int, int]], adapters: list[str | None], config: SchedulerConfig,
           num_slots: int, num_blocks: int | None = None, block_size: int = 16,
           on_step: Callable[[list[int]], None] | None = None) -> Replay:
    """Run the scheduler over (prompt, output) lengths as the engine would (by default with KV
    blocks for every request at once: no preemption). on_step gets each step's contexts (the
    tokens each scheduled sequence attends to)."""
    if num_blocks is None:
        num_blocks = sum(-(-(p + o) // block_size) for p, o in requests)
    sched = Scheduler(config, BlockManager(num_blocks, block_size), AdapterSlots(num_slots))
    for i, ((prompt, output), name) in enumerate(zip(requests, adapters, strict=True)):
        sched.add(Sequence(i, f"r{i}", [1] * prompt, SamplingParams(max_tokens=output), name))
    steps = adapter_reads = kv_tokens = 0
    while sched.has_work():
        out = sched.schedule()
        if not out.scheduled:
            raise RuntimeError("the replay stalled: nothing could be scheduled")
        steps += 1
        adapter_reads += len({s.seq.slot for s in out.scheduled if s.seq.slot >= 0})
        contexts = [s.start + s.num_new_tokens for s in out.scheduled]
        kv_tokens += sum(contexts)
        if on_step is not None:
            on_step(contexts)
        sched.advance(out)
        for s in out.scheduled:
            if s.samples:
                s.seq.output_ids.append(0)
                if len(s.seq.output_ids) >= s.seq.params.max_tokens:
                    sched.finish(s.seq, "length")
    return Replay(steps, adapter_reads, kv_tokens, sum(p + o for p, o in requests))


def floor_s(r: Replay, weight_bytes: int, adapter_bytes: int, kv_bytes_per_token: int,
            copy_gbps: float) -> float:
    moved = r.steps * weight_bytes + r.adapter_reads * adapter_bytes + \
        r.kv_tokens * kv_bytes_per_token
    return moved / (copy_gbps * 1e9)
