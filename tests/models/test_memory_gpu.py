"""On the GPU: an engine sized by its profiling step stays inside gpu_memory_utilization through
graph capture, its largest prefill step and sampling with every option (engine/sizing.py)."""

from __future__ import annotations

import dataclasses
import gc

import pytest
import torch

from punica.config import CacheConfig, EngineConfig, LoraConfig, ModelConfig
from punica.engine.llm_engine import LLMEngine
from punica.engine.scheduler import SchedulerConfig
from punica.engine.sizing import PROFILE_PARAMS
from punica.models.arch import ModelArch
from punica.models.random import random_adapter, random_model

pytestmark = pytest.mark.gpu
GIB = 2**30


def wide_arch() -> ModelArch:
    """Small weights, large activations: a 128k vocabulary and a wide MLP, so the step's
    activations and the sampler's [N, vocab] tensors are a visible share of the budget."""
    return ModelArch(model_type="llama", hidden_size=2048, intermediate_size=8192,
                     num_layers=4, num_heads=16, num_kv_heads=8, head_dim=128,
                     vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
                     rope_scaling=(), max_position_embeddings=4096, tie_word_embeddings=False,
                     qkv_bias=False, qk_norm=False, eos_token_ids=())


@pytest.mark.parametrize("utilization", [0.3])
def test_peak_stays_inside_the_budget(utilization: float) -> None:
    dev = torch.device("cuda")
    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(dev)
    outside = total - free - torch.cuda.memory_reserved(dev)  # CUDA context, other processes
    torch.cuda.reset_peak_memory_stats(dev)
    arch = wide_arch()
    model = random_model(arch, torch.bfloat16, dev)
    config = EngineConfig(ModelConfig("<random>", device="cuda", max_model_len=4096),
                          CacheConfig(gpu_memory_utilization=utilization),
                          LoraConfig(max_loras=8, max_lora_rank=16),
                          SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=8192))
    engine = LLMEngine(config, model=model)
    plan = engine.runner.memory
    assert plan.step_peak > GIB // 4 and plan.graph_reserve > 0  # the reserves were measured
    mib = 2**20

    def stage(name: str) -> str:
        return (f"{name}: allocated {torch.cuda.memory_allocated(dev) // mib} MiB, reserved "
                f"{torch.cuda.memory_reserved(dev) // mib} MiB")

    stages = [stage("built")]
    engine.warmup()
    stages.append(stage("warm"))
    for i in range(4):
        engine.add_lora_weights(random_adapter(f"a{i}", arch, 16, torch.bfloat16, seed=i))
    # The largest step: 256 prompts of 32 tokens in one 8,192-row prefill, every sampling
    # option, then decode steps of 256 rows.
    params = dataclasses.replace(PROFILE_PARAMS, max_tokens=4)
    for r in range(256):
        engine.add_request(f"r{r}", [(7 * r + j) % 1000 + 5 for j in range(32)], params,
                           adapter=f"a{r % 4}" if r % 5 else None)
    while engine.has_unfinished():
        engine.step()
    assert engine.step_stats.eager_steps >= 1 and engine.step_stats.graph_steps >= 1
    torch.cuda.synchronize(dev)
    peak = outside + torch.cuda.max_memory_reserved(dev)
    ceiling = utilization * total
    said = (f"peak {peak / GIB:.2f} GiB, ceiling {ceiling / GIB:.2f} GiB, KV "
            f"{plan.kv_bytes / GIB:.2f} GiB, step reserve {plan.step_peak / GIB:.2f} GiB, "
            f"graph reserve {plan.graph_reserve / GIB:.2f} GiB; outside {outside // mib} MiB; "
            + "; ".join(stages) + f"; run: max allocated "
            f"{torch.cuda.max_memory_allocated(dev) // mib} MiB, max reserved "
            f"{torch.cuda.max_memory_reserved(dev) // mib} MiB, step {plan.step_peak // mib}, "
            f"graphs {plan.graph_reserve // mib}")
    print(said)
    assert peak <= ceiling, said
    # and the reserves are not a gross over-estimate: the run came within 1.5 GiB of them
    assert ceiling - peak < 1.5 * GIB, said
    del engine, model
    gc.collect()
    torch.cuda.empty_cache()
