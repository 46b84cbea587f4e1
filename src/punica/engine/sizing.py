"""How many KV blocks fit: a byte budget on CPU, free device memory x utilisation on CUDA."""

from __future__ import annotations

import torch

from punica.config import CacheConfig
from punica.errors import CapacityError
from punica.models.arch import ModelArch


def kv_bytes_per_block(arch: ModelArch, dtype: torch.dtype, block_size: int) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return arch.num_layers * 2 * block_size * arch.num_kv_heads * arch.head_dim * elem


def kv_budget(cache: CacheConfig, device: torch.device) -> int:
    """Bytes the KV pool may take: on CUDA, the memory left under gpu_memory_utilization x the
    device's memory by what is allocated now (weights, adapter pool); on CPU, kv_cache_bytes."""
    if device.type != "cuda":
        return cache.kv_cache_bytes
    free, total = torch.cuda.mem_get_info(device)
    # Blocks the caching allocator holds but no tensor uses (e.g. an engine freed earlier in this
    # process) are ours to take too.
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free - (1 - cache.gpu_memory_utilization) * total)


def kv_blocks(arch: ModelArch, dtype: torch.dtype, cache: CacheConfig,
              device: torch.device) -> int:
    """Blocks for the KV pool; weights and adapter pools are already allocated when called."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    per_block = kv_bytes_per_block(arch, dtype, cache.block_size)
    budget = kv_budget(cache, device)
    blocks = budget // per_block
    if blocks < 1:
        raise CapacityError(f"no memory left for the KV cache ({budget} bytes budget, "
                            f"{per_block} bytes per block): raise gpu_memory_utilization, free "
                            "other users of the GPU, or set num_kv_blocks")
    return int(blocks)
