"""How many KV blocks fit: a byte budget on CPU; on CUDA what is left under
gpu_memory_utilization x the device's memory once everything else is counted.

On CUDA, everything else is: what is allocated when the pool is sized (weights, adapter pool,
workspaces, rotary tables), plus what a step needs beside them, measured by running one (as vLLM
does): the peak of an eager step of the largest batch (max_num_batched_tokens rows over
min(max_num_seqs, rows) sequences, every row through the LoRA pool, then sampling with top-p,
top-k, penalties and logprobs), plus the step graphs' private pool: the peak of the largest graph
shape, run eagerly the same way, and the logits and static inputs every graph keeps
(`cuda_graph.kept_bytes`), plus a fixed slack for the allocator's segments (SEGMENT_SLACK).
The caching allocator is capped at the same ceiling (`cap_process`), so its fragmentation cannot
carry the process past it. The profile runs over a one-block KV cache that every sequence reads
and writes (the kernels' memory does not depend on where the blocks are).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from punica.config import CacheConfig
from punica.engine.batch import synthetic_batch
from punica.engine.cuda_graph import buckets_of, graph_keys, kept_bytes
from punica.engine.sampler import sample_tokens
from punica.engine.sampling_params import SamplingParams
from punica.errors import CapacityError
from punica.models.arch import ModelArch
from punica.models.llama import StepContext

if TYPE_CHECKING:
    from punica.engine.model_runner import ModelRunner

PROFILE_PARAMS = SamplingParams(temperature=0.7, top_p=0.9, top_k=50, min_p=0.01,
                                presence_penalty=0.5, repetition_penalty=1.1, logprobs=20)
"""Sampling of the profiled step: every path of the sampler that allocates [N, vocab]."""


STRANDED = 1.25
"""The step reserve over the profiled step's peak: free bytes left inside segments the caching
allocator still uses, which no large tensor can take (at the process cap it frees only whole free
segments). On the H200 a run's cached blocks came to 1.4x its step's peak without the cap."""

SEGMENT_SLACK = 256 << 20
"""Bytes kept free beside the measured reserves for the allocator's segment granularity: each
pool (the default one, the step graphs' private one) holds whole segments, 2 MiB for small
blocks and 20 MiB or more for large ones, so a small model whose step needs kilobytes still
takes tens of MiB (on the H200, a pool sized to the last byte failed the first graph capture)."""


@dataclass(frozen=True)
class MemoryPlan:
    """How the KV pool was sized (bytes)."""

    num_blocks: int
    budget: int | None
    """What the KV pool and the step reserves may take together (None: num_blocks was fixed)."""
    step_peak: int = 0
    """An eager step of the largest batch beside the persistent tensors, times STRANDED."""
    graph_reserve: int = 0
    """The step graphs' private pool and static inputs."""
    kv_bytes: int = 0


def kv_bytes_per_block(arch: ModelArch, dtype: torch.dtype, block_size: int) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return arch.num_layers * 2 * block_size * arch.num_kv_heads * arch.head_dim * elem


def kv_budget(cache: CacheConfig, device: torch.device) -> int:
    """Bytes left: on CUDA, under gpu_memory_utilization x the device's memory by what is in use
    now (by anyone); on CPU, kv_cache_bytes. On CUDA the caching allocator first gives back its
    whole free segments (the profile's, an engine freed earlier in this process): free bytes left
    inside segments still in use cannot hold a new pool, so they are not counted."""
    if device.type != "cuda":
        return cache.kv_cache_bytes
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    return int(free - (1 - cache.gpu_memory_utilization) * total)


def plan_memory(runner: ModelRunner) -> MemoryPlan:
    """Size the KV pool of a runner whose other tensors are allocated (see module docstring)."""
    cc = runner.config.cache
    per_block = kv_bytes_per_block(runner.arch, runner.dtype, cc.block_size)
    if cc.num_blocks is not None:
        return MemoryPlan(cc.num_blocks, None, kv_bytes=cc.num_blocks * per_block)
    step_peak = graph_reserve = 0
    if runner.device.type == "cuda":
        sc = runner.config.scheduler
        step_peak = int(STRANDED * profile_step(runner, runner.max_tokens,
                                                min(sc.max_num_seqs, runner.max_tokens)))
        if runner.graphs_enabled:
            buckets, token_buckets = buckets_of(runner.graph_batch, runner.max_tokens)
            rows = max(token_buckets + buckets)
            graph_reserve = profile_step(runner, rows, min(rows, buckets[-1]), sample=False)
            keys = graph_keys(buckets, token_buckets, runner.decode_split is not None)
            graph_reserve += kept_bytes(keys, runner.arch.vocab_size, runner.max_blocks)
    budget = kv_budget(cc, runner.device)
    slack = SEGMENT_SLACK if runner.device.type == "cuda" else 0
    kv = budget - step_peak - graph_reserve - slack
    blocks = max(0, kv) // per_block
    if blocks < 1:
        raise CapacityError(
            f"no memory left for the KV cache: {budget / 2**30:.2f} GiB left under "
            f"gpu_memory_utilization, a step of the largest batch needs "
            f"{step_peak / 2**30:.2f} GiB, the step graphs {graph_reserve / 2**30:.2f} GiB and "
            f"the allocator's slack {slack / 2**30:.2f} GiB "
            f"({per_block} bytes per block): raise gpu_memory_utilization, lower "
            "max_num_batched_tokens or max_num_seqs, free other users of the GPU, or set "
            "num_kv_blocks")
    if runner.device.type == "cuda":
        cap_process(runner.device, budget)
    return MemoryPlan(int(blocks), budget, step_peak, graph_reserve, int(blocks) * per_block)


def cap_process(device: torch.device, budget: int) -> None:
    """Cap this process's CUDA caching allocator at what it holds now plus `budget`: the
    measured reserves count the bytes a step's tensors take, not the allocator's fragmentation
    (on the H200, a run's cached blocks came to 1.4x its step's peak); at the cap the allocator
    frees its cached blocks and retries rather than grow past gpu_memory_utilization.
    Process-wide: the last engine sized in a process sets it."""
    total = torch.cuda.get_device_properties(device).total_memory
    cap = torch.cuda.memory_reserved(device) + budget
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(min(1.0, max(0.0, cap / total)), index)


def profile_step(runner: ModelRunner, rows: int, seqs: int, sample: bool = True) -> int:
    """Peak bytes allocated beside what exists now by one eager step of `rows` prefill rows
    over `seqs` sequences (every row through the LoRA pool when there is one), and with
    `sample` the sampling of one token per sequence. Runs on any device; measures on CUDA
    (0 elsewhere)."""
    a, device, bs = runner.arch, runner.device, runner.config.cache.block_size
    seqs = max(1, min(seqs, rows))
    new = [rows // seqs + (i < rows % seqs) for i in range(seqs)]
    slot = 0 if runner.lora_pool is not None else -1
    batch, _ = synthetic_batch(new, new, [slot] * seqs, bs, device, first_block=None)
    kv = torch.zeros(a.num_layers, 2, 1, bs, a.num_kv_heads, a.head_dim, dtype=runner.dtype,
                     device=device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    ctx = StepContext(batch, kv, runner.rotary, runner.lora_pool, runner.attention)
    logits = runner.model(ctx)
    if sample:
        prompts = [s.seq.prompt_ids for s in batch.sampled]
        gen = torch.Generator(device=device).manual_seed(0)
        sample_tokens(logits, [PROFILE_PARAMS] * len(prompts), prompts,
                      [[] for _ in prompts], [None] * len(prompts), gen)
    if not cuda:
        return 0
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - before)
