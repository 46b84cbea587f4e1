"""The engine's step-time breakdown: every step counted once, as a graph or an eager step."""

from __future__ import annotations

import pytest
import torch

from punica.config import CacheConfig, EngineConfig, LoraConfig, ModelConfig
from punica.engine.llm_engine import LLMEngine
from punica.engine.sampling_params import SamplingParams
from punica.engine.scheduler import SchedulerConfig
from punica.engine.step_stats import StepStats
from punica.models.random import random_model, tiny


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_steps_are_counted_and_timed(async_scheduling: bool) -> None:
    arch = tiny()
    engine = LLMEngine(EngineConfig(
        model=ModelConfig("<random>", device="cpu", max_model_len=64),
        cache=CacheConfig(kv_cache_bytes=1 << 20), lora=LoraConfig(max_loras=0),
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64,
                                  async_scheduling=async_scheduling)),
        model=random_model(arch, torch.float32, torch.device("cpu")))
    assert engine.warmup() == 0.0  # no graphs on the CPU
    for i in range(3):
        engine.add_request(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=5, temperature=0.0,
                                                              ignore_eos=True))
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    s = engine.step_stats.summary()
    # one prefill step for the three prompts, then four decode steps; async, the fifth step's
    # tokens are settled by one more call, which launches nothing (all three are at max_tokens)
    assert steps == (6 if async_scheduling else 5)
    assert s["steps"] == s["eager_steps"] == 5 and s["graph_steps"] == 0
    for phase in ("schedule", "forward", "sample", "finish"):
        assert s[f"{phase}_ms"] > 0.0
    assert s["host_idle_ms"] == pytest.approx(s["schedule_ms"] + s["finish_ms"])
    engine.step_stats.reset()
    assert engine.step_stats == StepStats()
