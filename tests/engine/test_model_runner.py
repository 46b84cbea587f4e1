"""The ModelRunner under the engine and the benchmark rig: one step path, its memory plan, and the
attention backends behind one protocol (CPU; the GPU memory peak is tests/models/
test_memory_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from punica.bench.rig import Rig
from punica.config import CacheConfig, EngineConfig, LoraConfig, ModelConfig
from punica.engine.batch import synthetic_batch
from punica.engine.cuda_graph import graph_keys, kept_bytes
from punica.engine.llm_engine import LLMEngine
from punica.engine.model_runner import ModelRunner
from punica.engine.sampling_params import SamplingParams
from punica.engine.scheduler import SchedulerConfig
from punica.engine.sizing import kv_bytes_per_block, profile_step
from punica.models.attention_backends import (
    TorchAttention,
    TorchMeta,
    TritonAttention,
    TritonMeta,
    attention_backend,
)
from punica.models.random import random_adapter, random_model, tiny

CPU = torch.device("cpu")


def config(**cache: object) -> EngineConfig:
    return EngineConfig(ModelConfig("", device="cpu"), CacheConfig(**cache),
                        LoraConfig(max_loras=2, max_lora_rank=8),
                        SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64))


def test_kv_pool_sized_from_the_budget_or_fixed() -> None:
    arch = tiny()
    per_block = kv_bytes_per_block(arch, torch.float32, 16)
    assert per_block == 2 * 2 * 16 * 2 * 16 * 4  # layers x (K, V) x block x kv heads x dim x 4
    runner = ModelRunner(config(kv_cache_bytes=10 * per_block + 7),
                         random_model(arch, torch.float32, CPU))
    assert runner.num_blocks == 10 and runner.memory.budget == 10 * per_block + 7
    assert runner.memory.kv_bytes == 10 * per_block and runner.memory.step_peak == 0
    fixed = ModelRunner(config(num_blocks=3), random_model(arch, torch.float32, CPU))
    assert fixed.num_blocks == 3 and fixed.memory.budget is None
    assert tuple(fixed.kv_cache.shape) == (2, 2, 3, 16, 2, 16)


@pytest.mark.parametrize("max_loras", [0, 2])
def test_profile_step_runs_the_largest_batch_on_one_block(max_loras: int) -> None:
    """The profiled step (what sizing runs on CUDA) goes through the whole forward pass, the
    LoRA pool and the sampler on a one-block cache; on the CPU it measures nothing."""
    cfg = config(num_blocks=4)
    cfg = EngineConfig(cfg.model, cfg.cache, LoraConfig(max_loras=max_loras, max_lora_rank=8)
                       if max_loras else LoraConfig(max_loras=0), cfg.scheduler)
    runner = ModelRunner(cfg, random_model(tiny(), torch.float32, CPU))
    assert profile_step(runner, rows=64, seqs=3) == 0
    batch, blocks = synthetic_batch([22, 21, 21], [22, 21, 21], [0, 0, 0], 16, CPU,
                                    first_block=None)
    assert blocks == 0 and batch.block_tables == [[0, 0], [0, 0], [0, 0]]
    assert int(batch.slot_mapping.max()) < 16 and batch.num_tokens == 64


def test_graph_keys_and_what_they_keep() -> None:
    keys = graph_keys([1, 2], [16], split=True)
    assert keys == [(1, 1, True, False), (1, 1, True, True), (2, 2, True, False),
                    (2, 2, True, True), (16, 1, False, False), (16, 2, False, False)]
    one = kept_bytes([(16, 2, False, False)], vocab_size=100, max_blocks=4)
    # ids, positions, slot mapping [16] int64; per sequence a logits row (int64), a block
    # table row and four int32 vectors; cu_seqlens and indptr [3] int32; float32 logits [2, 100]
    assert one == 3 * 8 * 16 + 2 * (8 + 4 * 4 + 16) + 4 * 2 * 3 + 4 * 2 * 100


def test_attention_backends_by_name() -> None:
    assert isinstance(attention_backend("auto", CPU), TorchAttention)
    assert isinstance(attention_backend("auto", torch.device("cuda")), TritonAttention)
    assert isinstance(attention_backend("triton", CPU), TritonAttention)
    with pytest.raises(ValueError, match="flash"):
        attention_backend("flash", CPU)
    batch, _ = synthetic_batch([1, 1], [5, 9], [-1, 0], 16, CPU)
    meta = TritonAttention().metadata(batch, None)
    assert isinstance(meta, TritonMeta) and meta.decode_only and meta.split is None
    assert meta.seq_lens.tolist() == [5, 9] and meta.block_tables.dtype == torch.int32
    host = TorchAttention().metadata(batch, None)
    assert isinstance(host, TorchMeta) and host.seq_lens == [5, 9]
    assert host.block_tables == [[0], [1]]


def test_engine_and_rig_steps_are_the_runners() -> None:
    """The engine's first step of a request and the rig's step of the same sequence (same
    weights, same adapter, same prompt) give the same logits: one step path."""
    arch = tiny()
    torch.manual_seed(0)
    rig = Rig.build(arch, torch.float32, CPU, kv_tokens=64, num_slots=2, rank=8, max_tokens=64)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    batch = rig.batch([len(prompt)], [len(prompt)], [1])
    batch.input_ids.copy_(torch.tensor(prompt))
    want = rig.step(batch, use_lora=True)
    engine = LLMEngine(EngineConfig(ModelConfig("", device="cpu"), CacheConfig(num_blocks=64),
                                    LoraConfig(max_loras=2, max_lora_rank=8),
                                    SchedulerConfig(max_num_seqs=4)),
                       model=rig.model)
    engine.add_lora_weights(random_adapter("a0", arch, 8, torch.float32))
    engine.add_request("r", prompt, SamplingParams(max_tokens=1, temperature=0.0, logprobs=5),
                       adapter="a0")
    out = []
    while engine.has_unfinished():
        out += engine.step()
    top = out[-1].outputs[0].logprobs[0]
    want_lp = want.log_softmax(-1)[0]
    for token, lp in top.items():
        assert abs(float(want_lp[token]) - lp) < 1e-4
    assert out[-1].outputs[0].token_ids == [int(want.argmax())]
