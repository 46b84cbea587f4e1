"""The engine's ModelRunner with random weights, and hand-built decode/prefill batches: what the
step benchmarks time, without a scheduler in the way."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from punica.bench.workloads import segment_lengths
from punica.config import CacheConfig, EngineConfig, LoraConfig, ModelConfig
from punica.engine.batch import Batch, synthetic_batch
from punica.engine.model_runner import ModelRunner
from punica.engine.scheduler import SchedulerConfig
from punica.lora.pool import LoraPool
from punica.models.arch import ModelArch
from punica.models.random import random_adapter, random_model
from punica.models.registry import layout_of
from punica.ops.attention import DecodeSplit

BLOCK_SIZE = 16


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every weight: what each step reads at least once."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def adapter_bytes(arch: ModelArch, rank: int, elem: int) -> int:
    """Bytes of one adapter of `rank` on every LoRA projection of the family, every layer."""
    per_layer = sum(rank * sum(arch.proj_shape(p)) for p in layout_of(arch).projections)
    return per_layer * arch.num_layers * elem


def kv_bytes_per_token(arch: ModelArch, elem: int) -> int:
    """K and V of one token over all layers."""
    return arch.num_layers * 2 * arch.num_kv_heads * arch.head_dim * elem


class Rig:
    """A ModelRunner with random weights, every adapter slot filled, and the KV pool filled with
    noise: steps of hand-built batches run exactly as the engine's do (`step` is
    `ModelRunner.execute`)."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.arch, self.model, self.device = runner.arch, runner.model, runner.device
        self.kv_cache, self.rotary = runner.kv_cache, runner.rotary
        assert runner.lora_pool is not None
        self.lora: LoraPool = runner.lora_pool
        self.attention_backend = runner.attention.name

    @classmethod
    def build(cls, arch: ModelArch, dtype: torch.dtype, device: torch.device, kv_tokens: int,
              num_slots: int, rank: int, max_tokens: int, max_decode_batch: int = 128,
              attention: str = "auto") -> Rig:
        """`attention`: the backend (auto: Triton on CUDA, torch elsewhere; triton on the CPU
        runs the interpreter)."""
        config = EngineConfig(
            ModelConfig("", device=str(device), attention_backend=attention),
            CacheConfig(block_size=BLOCK_SIZE, num_blocks=-(-kv_tokens // BLOCK_SIZE)),
            LoraConfig(max_loras=num_slots, max_lora_rank=rank),
            SchedulerConfig(max_num_seqs=max_decode_batch, max_num_batched_tokens=max_tokens))
        runner = ModelRunner(config, random_model(arch, dtype, device))
        runner.kv_cache.normal_()
        adapter = random_adapter("a0", arch, rank, dtype)
        for slot in range(num_slots):  # the same bytes in every slot: timing does not care
            runner.load_adapter(slot, adapter)
        return cls(runner)

    @property
    def decode_split(self) -> DecodeSplit | None:
        return self.runner.decode_split

    def weight_bytes(self) -> int:
        return weight_bytes(self.model)

    def adapter_bytes(self, rank: int) -> int:
        return adapter_bytes(self.arch, rank, self.kv_cache.element_size())

    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.arch, self.kv_cache.element_size())

    def batch(self, new_tokens: list[int], contexts: list[int], slots: list[int]) -> Batch:
        """Sequences with contexts[b] tokens, the last new_tokens[b] computed this step."""
        batch, blocks = synthetic_batch(new_tokens, contexts, slots, BLOCK_SIZE, self.device)
        if blocks > self.kv_cache.shape[2]:
            raise ValueError(f"the rig's KV pool has {self.kv_cache.shape[2]} blocks, "
                             f"{blocks} needed")
        return batch

    def step(self, batch: Batch, use_lora: bool, use_graphs: bool = True,
             beside: bool | None = None, split: bool | None = None) -> torch.Tensor:
        """Logits of one step (ModelRunner.execute): steps a graph fits replay it (on CUDA,
        unless use_graphs is False), others run eagerly; beside: each LoRA shrink on the side
        stream beside its GEMM (on CUDA), else after it; None: as the engine does (beside in
        graphs, after in eager steps); split: the decode attention split over the KV length,
        None as the engine does (DecodeSplit.wanted), False never, True whenever the rig has a
        DecodeSplit."""
        return self.runner.execute(batch, use_lora, use_graphs, beside, split)


def mix_slots(mix: str, batch: int) -> list[int]:
    """Slot per sequence: one slot per segment of the mix; 'none' = base model only."""
    if mix == "none":
        return [-1] * batch
    out: list[int] = []
    for slot, length in enumerate(segment_lengths(mix, batch)):
        out.extend([slot] * length)
    return out


def median_ms(fn: Callable[[], object], device: torch.device, reps: int = 20,
              warmup: int = 3) -> float:
    """Median wall time of fn in ms (CUDA events on a GPU, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_GBps(device: torch.device, numel: int) -> float:
    src = torch.randn(numel, device=device, dtype=torch.float16)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, reps=10)
    return 2 * numel * 2 / (ms * 1e-3) / 1e9


def matmul_TFLOPs(device: torch.device, n: int, dtype: torch.dtype) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = median_ms(lambda: a @ b, device, reps=10)
    return 2 * n**3 / (ms * 1e-3) / 1e12
