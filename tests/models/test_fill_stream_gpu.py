"""Slot fills on the fill stream (ModelRunner.load_adapter): they run beside the work queued
before them, and everything queued after them sees the filled slot."""

from __future__ import annotations

import pytest
import torch

from punica.config import CacheConfig, EngineConfig, LoraConfig, ModelConfig
from punica.engine.model_runner import ModelRunner
from punica.engine.scheduler import SchedulerConfig
from punica.models.random import random_adapter, random_model, tiny

pytestmark = pytest.mark.gpu
SLEEP_CYCLES = 2_000_000_000
"""About a second of GPU time: far longer than a fill of a tiny adapter."""


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    arch = tiny()
    config = EngineConfig(ModelConfig("", device="cuda"), CacheConfig(num_blocks=8),
                          LoraConfig(max_loras=2, max_lora_rank=8), SchedulerConfig())
    return ModelRunner(config, random_model(arch, torch.float16, torch.device("cuda")))


def slot_contents(runner: ModelRunner, slot: int) -> torch.Tensor:
    """Every pool tensor's rows of `slot`, read on the current stream."""
    pool = runner.lora_pool
    assert pool is not None
    parts = [t[:, slot].flatten() for t in (*pool.A_all.values(), *pool.B_all.values())]
    return torch.cat([*parts, pool.ranks[:, :, slot].flatten().half()])


def test_a_fill_runs_beside_the_step_queued_before_it(runner: ModelRunner) -> None:
    """In steady state: a first fill (untimed) leaves the pinned staging and the device
    temporaries of its copies cached; a fill that has to allocate them synchronizes the device
    (cudaHostAlloc, cudaMalloc) and so waits for the step anyway."""
    adapter = random_adapter("a", runner.arch, 8, seed=1)
    runner.load_adapter(0, adapter)
    torch.cuda.synchronize()
    compute = torch.cuda.current_stream()
    busy = torch.cuda.Event()
    torch.cuda._sleep(SLEEP_CYCLES)  # a long step in flight
    busy.record(compute)
    runner.load_adapter(0, adapter)
    filled = torch.cuda.Event()
    filled.record(runner.fill_stream)
    filled.synchronize()
    assert not busy.query()  # the fill finished while the step before it still ran
    torch.cuda.synchronize()


def test_work_queued_after_a_fill_sees_the_slot_filled(runner: ModelRunner) -> None:
    torch.cuda.synchronize()
    before = slot_contents(runner, 1).clone()
    with torch.cuda.stream(runner.fill_stream):
        torch.cuda._sleep(SLEEP_CYCLES)  # the fill stream is slow: its copies come late
    runner.load_adapter(1, random_adapter("b", runner.arch, 4, seed=2))
    seen = slot_contents(runner, 1)  # queued on the compute stream right after the fill
    torch.cuda.synchronize()
    assert not torch.equal(seen, before)
    assert torch.equal(seen, slot_contents(runner, 1))
    assert int(runner.lora_pool.ranks[:, :, 1].max()) == 4
