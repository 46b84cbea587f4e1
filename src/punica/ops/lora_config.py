"""Launch configurations of the SGMV kernels, their default heuristics, and the workspace layout.

The defaults come from measurements on the H200 (`benchmarks/results/lora_op_sweep.json`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from punica.ops.tiles import grid_rows

MAX_SPLITS = 16
SPLIT_ROWS_BUDGET = 4096  # num_splits * T never exceeds max(T, this): bounds workspace and v reads
MIN_K_PER_SPLIT = 256
# Shrink programs to aim for (about 8 per SM on an H200): the sweep in lora_op_sweep.json put
# 16 splits at bs 64 Distinct 19% ahead of 8 in the shrink + expand pair.
SHRINK_TARGET_PROGRAMS = 1024
# Expand (row tile x column tile) pairs per program are grouped until about this many programs.
EXPAND_TARGET_PROGRAMS = 512
# Tile expand: 8 warps from a v tile (block_m x block_r fp32) of this many elements.
EXPAND_8_WARPS_TILE = 2048
# Row kernels (block_m = 1) for decode-shaped batches: at most this many rows, or segments this
# short on average. `scripts/row_probe.py` on the H200 (benchmarks/results/row_probe.json, rank 16,
# 4096 -> 11008): the row pair beat the tile pair at every decode batch measured, bs 1..128 and
# every mix (distinct bs 64: 14.2 vs 19.2 us; identical bs 64: 9.0 vs 12.6; bs 1: 5.4 vs 8.6).
ROW_KERNEL_MAX_TOKENS = 128
ROW_KERNEL_MAX_MEAN_LEN = 4
# ...and only for rank tiles up to this (per slice). H200, bs 64, 4096 -> 11008, graph replay
# (lora_op.json, run between 9a33e71 and b301dcc; columns graph_row / graph_tile): rank 64 row
# pair 87.0 / 70.1 / 67.3 us (Distinct / Uniform / Identical) vs tile 46.1 / 13.8 / 27.9; rank 32
# row 31.0 / 21.7 / 20.4 vs tile 31.4 / 13.5 / 17.7; rank 16 row 14.9 / 9.5 / 8.8 vs tile 19.7 /
# 10.3 / 12.5; rank 8 row 12.0 vs tile 17.9 (Distinct). Past rank 16 the tile pair is as fast or
# faster in every mix.
ROW_KERNEL_MAX_RANK = 16
# Row shrink: split-K programs x (block_r / 16) aimed at this many (8 splits at bs 64, 4 at 128,
# 16 at bs <= 32 were the fastest measured).
ROW_SHRINK_TARGET_PROGRAMS = 512
ROW_SHRINK_BLOCK_K = 256
# Register tiles of the row kernels, in elements. sm_90 ptxas (python -m punica.ops.resources): a
# shrink accumulator of 64 x 256 took 255 registers per thread (one 4-warp program per SM); an
# expand slab of 64 x 1024, held twice by the prefetch, spilled 7 KB per thread and ran 10x slower
# (rank 64, lora_op.json). Rank tiles past 16 get proportionally narrower K / N tiles.
ROW_SHRINK_TILE = 16 * ROW_SHRINK_BLOCK_K
ROW_EXPAND_TILE = 16 * 1024
# Small batches (2..8 rows): the fastest row pair at bs 8 Distinct, rank 16, 4096 -> 11008
# (row_probe.json, 42111e7): 8 shrink splits of 512 on 8 warps, 1024-column B slabs on 8 warps
# without the prefetch, 7.98 us against 11.1 for the 16 x 256 / 512-column prefetching pair (the
# previous default; lora_op.json, 42111e7). At bs 1 the fastest kept 16 x 256 and 512-column slabs
# without the prefetch: 5.40 against 6.3 us. The prefetch lost 1-3 us at bs 1-8 already at
# 3accdb7 (and gained 1-4 us at bs 16-64).
SMALL_BATCH_ROWS = 8


@dataclass(frozen=True)
class ShrinkConfig:
    """Launch parameters of the shrink kernel."""

    block_m: int
    """Rows per tile: 1 = the row kernel (one row per program, CUDA cores: decode batches);
    a power of two >= 16 = the tile kernel (tensor-core dot)."""
    block_r: int
    """Rank columns per program; rank tiles past a slot's rank exit at once."""
    block_k: int
    """Input features per loop step."""
    num_splits: int
    """Split-K factor: partials written to v[0:num_splits]."""
    num_warps: int = 4
    num_stages: int = 3
    use_pdl: bool | None = None
    """Programmatic dependent launch (Hopper+): None = on where the device supports it."""
    reduce: bool = False
    """Sum the split partials inside the shrink (last split to finish), so the expand reads one
    v tile; needs v_out and zeroed counters (add_lora carves both from its workspace)."""

    def __post_init__(self) -> None:
        _check_blocks(self.block_m, self.block_r)


@dataclass(frozen=True)
class ExpandConfig:
    """Launch parameters of the expand kernel."""

    block_m: int
    """Rows per tile: 1 = the row kernel, a power of two >= 16 = the tile kernel."""
    block_n: int
    """Output features per program."""
    block_r: int = 16
    """Rank columns held at once; must be >= the pool's max_rank (a power of two >= 16)."""
    tiles_per_program: int = 1
    """Consecutive BLOCK_N column tiles per program (amortises the tile lookup and v load)."""
    num_warps: int = 4
    num_stages: int = 3
    use_pdl: bool | None = False
    """Overlap launch and tile lookup with the previous kernel: valid only right after
    sgmv_shrink (add_lora turns it on there). None = on where supported."""
    prefetch: bool = True
    """Row kernel only: load B and y ahead (before the PDL wait, the next tile in the loop)."""

    def __post_init__(self) -> None:
        _check_blocks(self.block_m, self.block_r)


def _check_blocks(block_m: int, block_r: int) -> None:
    if block_m != 1 and (block_m < 16 or block_m & (block_m - 1)):
        raise ValueError(f"block_m: expected 1 or a power of two >= 16, got {block_m}")
    if block_r < 16 or block_r & (block_r - 1):
        raise ValueError(f"block_r: expected a power of two >= 16, got {block_r}")


def _block_m(num_tokens: int, num_segments: int) -> int:
    mean_len = num_tokens / max(num_segments, 1)
    return 16 if mean_len <= 16 else 32 if mean_len <= 32 else 64


def use_row_kernels(num_tokens: int, num_segments: int, max_rank: int) -> bool:
    """Decode-shaped batches (few rows, or short segments) of a small rank tile go to the row
    kernels; `max_rank` is per LoRA slice. shrink_config and expand_config both ask this with
    the same arguments, so a default pair is either both row or both tile kernels."""
    if max_rank > ROW_KERNEL_MAX_RANK:
        return False
    return (num_tokens <= ROW_KERNEL_MAX_TOKENS
            or num_tokens <= ROW_KERNEL_MAX_MEAN_LEN * max(num_segments, 1))


def row_shrink_config(num_tokens: int, num_segments: int, in_features: int,
                      max_rank: int, num_slices: int = 1) -> ShrinkConfig:
    """Row shrink launch (block_m = 1): split-K programs aimed at ROW_SHRINK_TARGET_PROGRAMS,
    an accumulator of ROW_SHRINK_TILE elements. Valid at any rank (explicit configs)."""
    block_r = min(64, max(16, triton.next_power_of_2(max_rank)))  # rank 128: two rank tiles
    # Rows that share an adapter read the same A slab (from L2 after the first): half the
    # programs do (row_probe.json: 4 splits best at bs 64 Uniform and Identical, 8 Distinct).
    target = ROW_SHRINK_TARGET_PROGRAMS
    if num_tokens >= 2 * num_segments:
        target //= 2
    splits = 1
    while (splits * 2 <= MAX_SPLITS
           and splits * 2 * num_tokens * num_slices * block_r // 16 <= target
           and in_features // (splits * 2) >= ROW_SHRINK_BLOCK_K
           and splits * 2 * num_tokens <= max(num_tokens, SPLIT_ROWS_BUDGET)):
        splits *= 2
    # At least 4 splits where K allows: fewer programs than rows x 4 left the H200 idle.
    while (splits < 4 and in_features // (splits * 2) >= ROW_SHRINK_BLOCK_K
           and splits * 2 * num_tokens <= max(num_tokens, SPLIT_ROWS_BUDGET)):
        splits *= 2
    block_k, warps = ROW_SHRINK_TILE // block_r, 4
    if 1 < num_tokens <= SMALL_BATCH_ROWS and splits > 8 and block_r == 16:
        # half the splits, twice the K step on twice the warps: fewer partials for the expand
        splits, block_k, warps = splits // 2, 2 * block_k, 8
    return ShrinkConfig(block_m=1, block_r=block_r, block_k=block_k, num_splits=splits,
                        num_warps=warps)


def row_expand_config(num_tokens: int, num_segments: int, max_rank: int) -> ExpandConfig:
    """Row expand launch (block_m = 1): the whole rank, B slabs of ROW_EXPAND_TILE elements.
    Valid at any rank (explicit configs)."""
    block_r = max(16, triton.next_power_of_2(max_rank))
    small = num_tokens <= SMALL_BATCH_ROWS
    block_n = min(512 if num_tokens == 1 else 1024, ROW_EXPAND_TILE // block_r)
    # Two column tiles per program helped only where every row reads its own B (distinct, bs 64
    # and 128 measured); at bs 32 the pair of prefetched 16 x 1024 slabs spilled (sm_90 ptxas).
    tiles = 2 if num_segments >= 64 and num_segments * 2 > num_tokens else 1
    warps = 8 if small and num_tokens > 1 else 4
    return ExpandConfig(block_m=1, block_n=block_n, block_r=block_r, tiles_per_program=tiles,
                        num_warps=warps, prefetch=not small)


def tile_shrink_config(num_tokens: int, num_segments: int, in_features: int,
                       max_rank: int, num_slices: int = 1) -> ShrinkConfig:
    """Tile shrink launch (block_m >= 16, tensor cores): enough split-K programs to stream A at
    full bandwidth. Valid for any batch (explicit configs)."""
    block_m = _block_m(num_tokens, num_segments)
    block_r = min(64, max(16, triton.next_power_of_2(max_rank)))
    tiles = num_slices * min(num_tokens, triton.cdiv(num_tokens, block_m) + num_segments)
    splits = 1
    while (splits * 2 <= MAX_SPLITS and tiles * splits < SHRINK_TARGET_PROGRAMS
           and in_features // (splits * 2) >= MIN_K_PER_SPLIT
           and splits * 2 * num_tokens <= max(num_tokens, SPLIT_ROWS_BUDGET)):
        splits *= 2
    return ShrinkConfig(block_m=block_m, block_r=block_r, block_k=64, num_splits=splits)


def tile_expand_config(num_tokens: int, num_segments: int, out_features: int,
                       max_rank: int) -> ExpandConfig:
    """Tile expand launch (block_m >= 16, tensor cores): the whole rank, column tiles grouped
    until about EXPAND_TARGET_PROGRAMS programs. Valid for any batch (explicit configs)."""
    block_m = _block_m(num_tokens, num_segments)
    block_r = max(16, triton.next_power_of_2(max_rank))
    block_n = max(32, min(256 if block_m == 16 else 128, 8192 // block_r))
    tiles = grid_rows(num_tokens, num_segments, block_m) * triton.cdiv(out_features, block_n)
    per_program = max(1, min(8, tiles // EXPAND_TARGET_PROGRAMS))
    # The v tiles of all NUM_SPLITS partials are loaded at once: with 4 warps a 64 x 128 tile
    # spilled ~1 KB per thread, and at 16 splits (small batches) 16 x 128 and 32 x 64 tiles
    # 64-148 bytes; 8 warps spilled none of them (sm_90 ptxas, python -m punica.ops.resources).
    warps = 8 if block_m * block_r >= EXPAND_8_WARPS_TILE else 4
    return ExpandConfig(block_m=block_m, block_n=block_n, block_r=block_r,
                        tiles_per_program=per_program, num_warps=warps)


@functools.cache
def shrink_config(num_tokens: int, num_segments: int, in_features: int,
                  max_rank: int, num_slices: int = 1) -> ShrinkConfig:
    """Default shrink launch: the row kernel for decode-shaped batches of a small rank
    (`use_row_kernels`), else the tile kernel. `max_rank` is per LoRA slice."""
    if use_row_kernels(num_tokens, num_segments, max_rank):
        return row_shrink_config(num_tokens, num_segments, in_features, max_rank, num_slices)
    return tile_shrink_config(num_tokens, num_segments, in_features, max_rank, num_slices)


@functools.cache
def expand_config(num_tokens: int, num_segments: int, out_features: int,
                  max_rank: int) -> ExpandConfig:
    """Default expand launch: row or tile kernel as `use_row_kernels` says, like shrink_config
    for the same call. `max_rank` is per LoRA slice."""
    if use_row_kernels(num_tokens, num_segments, max_rank):
        return row_expand_config(num_tokens, num_segments, max_rank)
    return tile_expand_config(num_tokens, num_segments, out_features, max_rank)


def workspace_numel(max_tokens: int, max_rank: int, num_slices: int = 1) -> int:
    """Float32 elements a workspace needs for any call of up to `max_tokens` rows and
    `num_slices` LoRA slices of rank <= max_rank each: split partials, the reduced v, and one
    int32 arrival counter per (row tile, rank tile)."""
    width = num_slices * max_rank
    return (max(max_tokens, SPLIT_ROWS_BUDGET) * width + max_tokens * width
            + max_tokens * num_slices * triton.cdiv(max_rank, 16))


def workspace_views(workspace: torch.Tensor, num_splits: int, num_tokens: int,
                    max_rank: int, num_slices: int = 1,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(v partials [S, T, R], reduced v [1, T, R], counters int32) inside a zeroed workspace.

    Partials and v start at the front; the counters sit at the very end, a region that no
    call's partials or v reach (workspace_numel reserves it for its largest T), so they stay all
    zero between calls: workspaces are allocated with torch.zeros and the kernel resets every
    counter it uses.
    """
    width = num_slices * max_rank
    partials = num_splits * num_tokens * width
    reduced = num_tokens * width
    counters = num_tokens * num_slices * triton.cdiv(max_rank, 16)
    v = workspace[:partials].view(num_splits, num_tokens, width)
    v_out = workspace[partials: partials + reduced].view(1, num_tokens, width)
    tail = workspace[workspace.numel() - counters:]
    return v, v_out, tail.view(torch.int32)
