"""The textgen floor: the scheduler replayed without a model, steps charged their bytes."""

from __future__ import annotations

import pytest
import torch

from punica.bench.textgen_floor import Replay, floor_s, replay
from punica.config import CacheConfig, EngineConfig, LoraConfig, ModelConfig
from punica.engine.llm_engine import LLMEngine
from punica.engine.sampling_params import SamplingParams
from punica.engine.scheduler import SchedulerConfig
from punica.models.random import random_adapter, random_model, tiny


def test_hand_counted_replay() -> None:
    # r0: 2 prompt + 3 output tokens (adapter a), r1: 1 + 1 (adapter b), both admitted at once.
    # step 1: both prefills (contexts 2 and 1), both sample; r1 is done
    # step 2: r0 decodes (context 3); step 3: r0 decodes (context 4) and is done
    r = replay([(2, 3), (1, 1)], ["a", "b"], SchedulerConfig(max_num_seqs=2), num_slots=2)
    assert r == Replay(steps=3, adapter_reads=2 + 1 + 1, kv_tokens=3 + 3 + 4, tokens=7)
    assert floor_s(r, weight_bytes=100, adapter_bytes=10, kv_bytes_per_token=1,
                   copy_gbps=1e-9) == pytest.approx(3 * 100 + 4 * 10 + 10)


def test_one_slot_serialises_adapters() -> None:
    # one adapter slot: b waits until a finishes; base-model requests take no slot
    r = replay([(1, 2), (1, 2), (1, 1)], ["a", "b", None], SchedulerConfig(max_num_seqs=4),
               num_slots=1)
    # step 1: a, base prefill (base done); 2: a done; 3: b prefill; 4: b done
    assert (r.steps, r.adapter_reads) == (4, 4)


def test_replay_steps_equal_the_engines() -> None:
    arch = tiny()
    requests = [(3, 5), (9, 2), (1, 7), (4, 4), (2, 1), (6, 3)]
    names = ["a0", "a1", "a2", "a0", None, "a1"]
    # The replay is the synchronous schedule (async steps add ride-along steps: see textgen's
    # smoke test)
    config = SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=8, async_scheduling=False)
    engine = LLMEngine(EngineConfig(
        model=ModelConfig("<random>", device="cpu", max_model_len=64),
        cache=CacheConfig(kv_cache_bytes=1 << 20), lora=LoraConfig(max_loras=2, max_lora_rank=4),
        scheduler=config), model=random_model(arch, torch.float32, torch.device("cpu")))
    base = random_adapter("base", arch, 4, torch.float32)
    for n in ("a0", "a1", "a2"):
        engine.add_lora_weights(random_adapter(n, arch, 4, shared=base))
    for i, ((p, o), name) in enumerate(zip(requests, names, strict=True)):
        engine.add_request(f"r{i}", list(range(1, p + 1)), SamplingParams(
            max_tokens=o, temperature=0.0, ignore_eos=True), name)
    while engine.has_unfinished():
        engine.step(updates=False)
    r = replay(requests, names, config, num_slots=2,
               num_blocks=engine.scheduler.blocks.num_blocks)
    assert r.steps == engine.step_stats.steps
    assert r.tokens == sum(p + o for p, o in requests)


def test_textgen_table_renders_breakdown_and_floor() -> None:
    from punica.bench.report import textgen_table

    stats = {"steps": 10, "eager_steps": 1, "schedule_ms": 0.5, "forward_ms": 0.25,
             "sample_ms": 8.0, "finish_ms": 0.125}
    result = {"device": "GPU", "torch": "t", "commit": "abc", "date": "d", "num_requests": 2,
              "maxlen": 64, "command": "punica bench textgen", "rows": [
                  {"engine": "hf+peft", "mix": "distinct", "cap": 2, "tok_s": 20.0,
                   "output_tok_s": 10.0, "wall_s": 3.0},
                  {"engine": "punica", "mix": "distinct", "cap": 0, "tok_s": 1800.0,
                   "output_tok_s": 1750.0, "wall_s": 4.0, "floor_tok_s": 3600.0,
                   "step_stats": stats, "rehearsal_s": 1.25}]}
    table = textgen_table(result)
    assert "| hf+peft | distinct | 2 | 20 | 10 | 3.0 | — | — | — | — | — |" in table
    assert ("| punica | distinct | none | 1800 | 1750 | 4.0 | 3600 | 50% | "
            "0.50 / 0.25 / 8.00 / 0.12 | 10 (1) | 1.2 |") in table
