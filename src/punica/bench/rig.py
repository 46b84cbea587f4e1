"""A model, KV pool and adapter pool with random weights, and hand-built decode/prefill batches:
what the step benchmarks time, without a scheduler in the way."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from punica.bench.workloads import segment_lengths
from punica.config import ModelConfig
from punica.engine.batch import Batch, build_batch
from punica.engine.cuda_graph import StepGraphs
from punica.engine.sampling_params import SamplingParams
from punica.engine.scheduler import ScheduledSeq
from punica.engine.sequence import Sequence
from punica.lora.pool import LoraPool
from punica.models.arch import ModelArch
from punica.models.llama import CausalLM, StepContext, decode_split_of
from punica.models.random import random_adapter, random_model
from punica.models.rope import Rotary
from punica.ops.attention import DecodeSplit

BLOCK_SIZE = 16


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every weight: what each step reads at least once."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def adapter_bytes(arch: ModelArch, rank: int, elem: int) -> int:
    """Bytes of one adapter of `rank` on all seven projections of every layer."""
    per_layer = sum(rank * sum(arch.proj_shape(p)) for p in
                    ("q", "k", "v", "o", "gate", "up", "down"))
    return per_layer * arch.num_layers * elem


def kv_bytes_per_token(arch: ModelArch, elem: int) -> int:
    """K and V of one token over all layers."""
    return arch.num_layers * 2 * arch.num_kv_heads * arch.head_dim * elem


@dataclass
class Rig:
    arch: ModelArch
    model: CausalLM
    kv_cache: torch.Tensor
    lora: LoraPool
    rotary: Rotary
    device: torch.device
    attention_backend: str
    graphs: dict[tuple[bool, bool], StepGraphs] | None = None
    """Decode steps replay CUDA graphs as the engine's do, by (use_lora, beside): without the
    LoRA pool, with it and each shrink beside its GEMM (the engine's default), with it and each
    shrink after its GEMM."""
    lora_stream: torch.cuda.Stream | None = None
    decode_split: DecodeSplit | None = None
    """The engine's default DecodeSplit (on CUDA), taken by the steps it wants, graphs or not."""

    @classmethod
    def build(cls, arch: ModelArch, dtype: torch.dtype, device: torch.device, kv_tokens: int,
              num_slots: int, rank: int, max_tokens: int, max_decode_batch: int = 128) -> Rig:
        model = random_model(arch, dtype, device)
        blocks = -(-kv_tokens // BLOCK_SIZE)
        kv = torch.randn(arch.num_layers, 2, blocks, BLOCK_SIZE, arch.num_kv_heads,
                         arch.head_dim, dtype=dtype, device=device)
        pool = LoraPool(arch, num_slots, rank, max_tokens, dtype, device)
        adapter = random_adapter("a0", arch, rank, dtype)
        for slot in range(num_slots):  # the same bytes in every slot: timing does not care
            pool.load(slot, adapter)
        backend = "triton" if device.type == "cuda" else "torch"
        rotary = Rotary(arch, arch.max_position_embeddings, device)
        graphs, stream, split = None, None, None
        if device.type == "cuda":
            max_blocks = -(-arch.max_position_embeddings // BLOCK_SIZE)
            stream = torch.cuda.Stream(device)
            split = DecodeSplit.allocate(ModelConfig("").decode_split_tokens,
                                         arch.max_position_embeddings, max_decode_batch,
                                         arch.num_heads, arch.head_dim, device)
            graphs = {(use, beside): StepGraphs(model, kv, rotary, pool if use else None,
                                                max_decode_batch, max_blocks, device,
                                                lora_stream=stream if beside else None,
                                                decode_split=split)
                      for use, beside in ((False, False), (True, True), (True, False))}
        return cls(arch, model, kv, pool, rotary, device, backend, graphs, stream, split)

    def weight_bytes(self) -> int:
        return weight_bytes(self.model)

    def adapter_bytes(self, rank: int) -> int:
        return adapter_bytes(self.arch, rank, self.kv_cache.element_size())

    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.arch, self.kv_cache.element_size())

    def batch(self, new_tokens: list[int], contexts: list[int], slots: list[int]) -> Batch:
        """Sequences with contexts[b] tokens, the last new_tokens[b] computed this step."""
        scheduled, tables, next_block = [], {}, 0
        for i, (n, ctx, slot) in enumerate(zip(new_tokens, contexts, slots, strict=True)):
            seq = Sequence(i, f"b{i}", [1] * ctx, SamplingParams(), None, slot=slot)
            blocks = -(-ctx // BLOCK_SIZE)
            tables[i] = list(range(next_block, next_block + blocks))
            next_block += blocks
            scheduled.append(ScheduledSeq(seq, n, ctx - n, True))
        if next_block > self.kv_cache.shape[2]:
            raise ValueError(f"the rig's KV pool has {self.kv_cache.shape[2]} blocks, "
                             f"{next_block} needed")
        return build_batch(scheduled, tables, BLOCK_SIZE, self.device)

    def step(self, batch: Batch, use_lora: bool, use_graphs: bool = True,
             beside: bool | None = None, split: bool | None = None) -> torch.Tensor:
        """Logits of one step: decode-only batches replay a CUDA graph (on CUDA, unless
        use_graphs is False), others run eagerly; beside: each LoRA shrink on the side stream
        beside its GEMM (on CUDA), else after it; None: as the engine does (beside in graphs,
        after in eager steps); split: the decode attention split over the KV length, None as the
        engine does (DecodeSplit.wanted), False never, True whenever the rig has a DecodeSplit."""
        graphs = use_graphs and self.graphs is not None and batch.decode_only
        beside = use_lora and (graphs if beside is None else beside)
        if graphs:
            assert self.graphs is not None
            return self.graphs[use_lora, beside].run(batch, split)
        decode_split = decode_split_of(self.decode_split, batch) if split is None else (
            self.decode_split if split and batch.decode_only else None)
        ctx = StepContext(batch, self.kv_cache, self.rotary, self.lora if use_lora else None,
                          self.attention_backend, self.lora_stream if beside else None,
                          decode_split)
        return self.model(ctx)


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
