"""Row kernels of SGMV: one batch row per program, on CUDA cores (block_m = 1 in the configs).

Decode batches have about one row per segment. The tile kernels (`lora_kernels.py`) still run a
16-row tensor-core tile per segment there, so 15 of its 16 rows are masked: the y tile loads,
the dot and the registers they take are mostly waste, and the expand streams B in small pieces.
Here a program owns one row: the shrink is a GEMV over a K split of A[slot] (partials as in the
tile kernel, the same `v` layout and REDUCE option), the expand multiplies the row's v by a
[BLOCK_R, BLOCK_N] slab of B[slot] with one wide load per column tile, and rank rows past the
slot's rank are never loaded. Rows are numbered like the tile kernels' tiles with BLOCK_M = 1
(`lora_kernels.locate_adapter_tile`): grid axis 0 is T, rows of base-only segments exit at once.

Both compute in fp32 (no tensor cores), so fp16/bf16 results differ from the tile kernels' only
by rounding order.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from punica.ops.lora_kernels import _reduce_splits, locate_adapter_tile, slice_columns


@triton.jit
def sgmv_shrink_rows_kernel(
    x_ptr, a_ptr, v_ptr, indptr_ptr, slots_ptr, ranks_ptr, vout_ptr, counters_ptr,
    num_segments, num_slots, max_rank, K, k_per_split, num_rank_tiles, tiles_per_slice,
    slice_stride, stride_xm, stride_as, stride_ar, stride_vs, stride_vm, stride_om,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
    USE_PDL: tl.constexpr, REDUCE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    FENCE: tl.constexpr,
):
    """v[split, row, r-tile] = x[row, k-split] @ A[slot, r-tile, k-split].T  (fp32 partial)."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
    ls = pid_r // tiles_per_slice  # the LoRA slice of this rank tile (lora_kernels.py)
    ok, row, _, slot, rank = locate_adapter_tile(indptr_ptr, slots_ptr,
                                                 ranks_ptr + ls * slice_stride, num_segments,
                                                 num_slots, max_rank, pid_m, 1, BLOCK_S)
    if not ok:
        return
    r_start = (pid_r - ls * tiles_per_slice) * BLOCK_R
    if r_start >= rank:
        return
    mask_r = r_start + tl.arange(0, BLOCK_R) < rank
    offs_r = ls * max_rank + r_start + tl.arange(0, BLOCK_R)  # rows of A, columns of v
    offs_k = tl.arange(0, BLOCK_K)
    k_start = pid_k * k_per_split
    row64 = row.to(tl.int64)
    x_ptrs = x_ptr + row64 * stride_xm + k_start + offs_k
    a_ptrs = (a_ptr + slot.to(tl.int64) * stride_as + offs_r[:, None] * stride_ar
              + (k_start + offs_k)[None, :])
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for k in range(0, k_per_split, BLOCK_K):
        mask_k = (k_start + k + offs_k) < K
        x_vec = tl.load(x_ptrs, mask=mask_k, other=0.0)
        a_tile = tl.load(a_ptrs, mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        acc += a_tile.to(tl.float32) * x_vec.to(tl.float32)[None, :]
        x_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
    v = tl.sum(acc, axis=1)
    tl.store(v_ptr + pid_k * stride_vs + row64 * stride_vm + offs_r, v, mask=mask_r)
    if REDUCE:
        rows64 = row64 + tl.zeros((1,), dtype=tl.int64)
        _reduce_splits(v_ptr, vout_ptr, counters_ptr + pid_m * num_rank_tiles + pid_r, rows64,
                       offs_r, mask_r[None, :], stride_vs, stride_vm, stride_om, NUM_SPLITS,
                       FENCE)


@triton.jit
def sgmv_expand_rows_kernel(
    v_ptr, b_ptr, y_ptr, indptr_ptr, slots_ptr, ranks_ptr, scales_ptr,
    num_segments, num_slots, max_rank, N, tiles_per_program, slice_stride, n1, n2,
    stride_vs, stride_vm, stride_bs, stride_br, stride_ym,
    NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr, USE_PDL: tl.constexpr, PREFETCH: tl.constexpr,
    EARLY_Y: tl.constexpr,
):
    """y[row, n-tiles] += scale[slot] * v.sum(0)[row, :rank] @ B[slot, :rank, n-tiles].

    PREFETCH: load the first B slab (and, with EARLY_Y, the y row) before waiting for the kernel
    before (PDL) and each next tile while the current one is summed; it holds two tiles in
    registers (see the tile caps in lora_config.py). EARLY_Y only where y is complete before that
    wait: right after this pair's shrink (PDL note in lora_kernels.py), not after the GEMM that
    writes y (`add_lora_beside`).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    ls = tl.program_id(2)  # the LoRA slice (lora_kernels.py)
    n_lo, n_hi = slice_columns(ls, n1, n2, N)
    n_first = n_lo + pid_n * tiles_per_program * BLOCK_N
    if n_first >= n_hi:
        return
    ok, row, _, slot, rank = locate_adapter_tile(indptr_ptr, slots_ptr,
                                                 ranks_ptr + ls * slice_stride, num_segments,
                                                 num_slots, max_rank, pid_m, 1, BLOCK_S)
    if not ok:
        return
    scale = tl.load(scales_ptr + ls * slice_stride + slot)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    row64 = row.to(tl.int64)
    b_rows = b_ptr + slot.to(tl.int64) * stride_bs + offs_r[:, None] * stride_br
    y_row = y_ptr + row64 * stride_ym
    offs_n = n_first + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_hi
    if PREFETCH:
        # B does not depend on the kernel before: its latency overlaps that kernel.
        b_tile = tl.load(b_rows + offs_n[None, :], mask=mask_r[:, None] & mask_n[None, :],
                         other=0.0)
        if EARLY_Y:
            y_vec = tl.load(y_row + offs_n, mask=mask_n, other=0.0)
    if USE_PDL:
        gdc_wait()  # v is the shrink's output (and, without EARLY_Y, y the GEMM's)
    if PREFETCH and not EARLY_Y:
        y_vec = tl.load(y_row + offs_n, mask=mask_n, other=0.0)
    v_ptrs = v_ptr + row64 * stride_vm + ls * max_rank + offs_r
    v = tl.load(v_ptrs, mask=mask_r, other=0.0)
    for split in tl.static_range(1, NUM_SPLITS):
        v += tl.load(v_ptrs + split * stride_vs, mask=mask_r, other=0.0)
    v = v * scale
    for i in range(0, tiles_per_program):
        if not PREFETCH:
            b_tile = tl.load(b_rows + offs_n[None, :], mask=mask_r[:, None] & mask_n[None, :],
                             other=0.0)
            y_vec = tl.load(y_row + offs_n, mask=mask_n, other=0.0)
        acc = tl.sum(b_tile.to(tl.float32) * v[:, None], axis=0)
        tl.store(y_row + offs_n, (y_vec.to(tl.float32) + acc).to(y_ptr.dtype.element_ty),
                 mask=mask_n)
        offs_n += BLOCK_N
        mask_n = offs_n < n_hi
        if PREFETCH:  # the next tile; after the program's last, nothing
            mask_next = mask_n & (i + 1 < tiles_per_program)
            b_tile = tl.load(b_rows + offs_n[None, :], mask=mask_r[:, None] & mask_next[None, :],
                             other=0.0)
            y_vec = tl.load(y_row + offs_n, mask=mask_next, other=0.0)
