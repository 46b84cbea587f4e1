"""Row-group kernels of SGMV: ROWS (2, 4 or 8) rows of one segment per program, on CUDA cores
(block_m = ROWS in the configs).

The row kernels (`lora_row_kernels.py`) give each row its own program, so rows that share an
adapter each load the same A and B slabs again (from L2 after the first): at bs 64 Identical the
row expand streams 64 copies of B's slabs through L2, and the pair took 8.9 us against 5.0 us at
bs 1 (lora_op.json, 67c06f4). Here a program owns up to ROWS rows of one segment: each A tile and
B slab it loads serves all of them. Distinct batches (one row per segment) gain nothing from
this and keep the row kernels.

Tiles are numbered as in the tile kernels with BLOCK_M = ROWS (`lora_kernels.locate_adapter_tile`);
the v layout, the split-K partials, REDUCE, PDL and the expand's PREFETCH / EARLY_Y are those of
the row kernels. Both compute in fp32 without tensor cores: the products are a
[ROWS, BLOCK_R, BLOCK_K] (shrink) or [ROWS, BLOCK_R, BLOCK_N] (expand) broadcast summed over the
shared axis, so the configs cap ROWS * BLOCK_K and ROWS * BLOCK_N (lora_config.py).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from punica.ops.lora_kernels import _reduce_splits, locate_adapter_tile, slice_columns


@triton.jit
def sgmv_shrink_group_kernel(
    x_ptr, a_ptr, v_ptr, indptr_ptr, slots_ptr, ranks_ptr, vout_ptr, counters_ptr,
    num_segments, num_slots, max_rank, K, k_per_split, num_rank_tiles, tiles_per_slice,
    slice_stride, stride_xm, stride_as, stride_ar, stride_vs, stride_vm, stride_om,
    ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
    USE_PDL: tl.constexpr, REDUCE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    FENCE: tl.constexpr,
):
    """v[split, rows, r-tile] = x[rows, k-split] @ A[slot, r-tile, k-split].T  (fp32 partials,
    rows: up to ROWS rows of one segment)."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
    ls = pid_r // tiles_per_slice  # the LoRA slice of this rank tile (lora_kernels.py)
    ok, row_start, row_end, slot, rank = locate_adapter_tile(
        indptr_ptr, slots_ptr, ranks_ptr + ls * slice_stride, num_segments, num_slots, max_rank,
        pid_m, ROWS, BLOCK_S)
    if not ok:
        return
    r_start = (pid_r - ls * tiles_per_slice) * BLOCK_R
    if r_start >= rank:
        return
    offs_m = row_start + tl.arange(0, ROWS)
    mask_m = offs_m < row_end
    mask_r = r_start + tl.arange(0, BLOCK_R) < rank
    offs_r = ls * max_rank + r_start + tl.arange(0, BLOCK_R)  # rows of A, columns of v
    offs_k = tl.arange(0, BLOCK_K)
    k_start = pid_k * k_per_split
    rows64 = offs_m.to(tl.int64)
    x_ptrs = x_ptr + rows64[:, None] * stride_xm + (k_start + offs_k)[None, :]
    a_ptrs = (a_ptr + slot.to(tl.int64) * stride_as + offs_r[:, None] * stride_ar
              + (k_start + offs_k)[None, :])
    acc = tl.zeros((ROWS, BLOCK_R, BLOCK_K), dtype=tl.float32)
    for k in range(0, k_per_split, BLOCK_K):
        mask_k = (k_start + k + offs_k) < K
        x_tile = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        a_tile = tl.load(a_ptrs, mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        acc += x_tile.to(tl.float32)[:, None, :] * a_tile.to(tl.float32)[None, :, :]
        x_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
    v = tl.sum(acc, axis=2)
    mask_v = mask_m[:, None] & mask_r[None, :]
    tl.store(v_ptr + pid_k * stride_vs + rows64[:, None] * stride_vm + offs_r[None, :], v,
             mask=mask_v)
    if REDUCE:
        _reduce_splits(v_ptr, vout_ptr, counters_ptr + pid_m * num_rank_tiles + pid_r, rows64,
                       offs_r, mask_v, stride_vs, stride_vm, stride_om, NUM_SPLITS, FENCE)


@triton.jit
def _load_v_row(v_row, offs_r, mask, stride_vs, NUM_SPLITS: tl.constexpr):
    """sum over splits of v[split, row, offs_r] (v_row: the row's start in split 0): NUM_SPLITS
    independent loads."""
    total = tl.load(v_row + offs_r, mask=mask, other=0.0)
    for split in tl.static_range(1, NUM_SPLITS):
        total += tl.load(v_row + split * stride_vs + offs_r, mask=mask, other=0.0)
    return total


@triton.jit
def sgmv_expand_group_kernel(
    v_ptr, b_ptr, y_ptr, indptr_ptr, slots_ptr, ranks_ptr, scales_ptr,
    num_segments, num_slots, max_rank, N, tiles_per_program, slice_stride, n1, n2,
    stride_vs, stride_vm, stride_bs, stride_br, stride_ym,
    NUM_SPLITS: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, USE_PDL: tl.constexpr,
    PREFETCH: tl.constexpr, EARLY_Y: tl.constexpr,
):
    """y[rows, n-tiles] += scale[slot] * v.sum(0)[rows, :rank] @ B[slot, :rank, n-tiles]
    (rows: up to ROWS rows of one segment). PREFETCH and EARLY_Y as in the row expand."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    ls = tl.program_id(2)  # the LoRA slice (lora_kernels.py)
    n_lo, n_hi = slice_columns(ls, n1, n2, N)
    n_first = n_lo + pid_n * tiles_per_program * BLOCK_N
    if n_first >= n_hi:
        return
    ok, row_start, row_end, slot, rank = locate_adapter_tile(
        indptr_ptr, slots_ptr, ranks_ptr + ls * slice_stride, num_segments, num_slots, max_rank,
        pid_m, ROWS, BLOCK_S)
    if not ok:
        return
    scale = tl.load(scales_ptr + ls * slice_stride + slot)
    offs_m = row_start + tl.arange(0, ROWS)
    mask_m = offs_m < row_end
    rows64 = offs_m.to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    b_rows = b_ptr + slot.to(tl.int64) * stride_bs + offs_r[:, None] * stride_br
    y_rows = y_ptr + rows64[:, None] * stride_ym
    offs_n = n_first + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_hi
    if PREFETCH:
        # B does not depend on the kernel before: its latency overlaps that kernel.
        b_tile = tl.load(b_rows + offs_n[None, :], mask=mask_r[:, None] & mask_n[None, :],
                         other=0.0)
        if EARLY_Y:
            y_tile = tl.load(y_rows + offs_n[None, :], mask=mask_m[:, None] & mask_n[None, :],
                             other=0.0)
    if USE_PDL:
        gdc_wait()  # v is the shrink's output (and, without EARLY_Y, y the GEMM's)
    if PREFETCH and not EARLY_Y:
        y_tile = tl.load(y_rows + offs_n[None, :], mask=mask_m[:, None] & mask_n[None, :],
                         other=0.0)
    v_first = v_ptr + ls * max_rank + row_start.to(tl.int64) * stride_vm  # the group's row 0
    for i in range(0, tiles_per_program):
        mask_y = mask_m[:, None] & mask_n[None, :]
        if not PREFETCH:
            b_tile = tl.load(b_rows + offs_n[None, :], mask=mask_r[:, None] & mask_n[None, :],
                             other=0.0)
            y_tile = tl.load(y_rows + offs_n[None, :], mask=mask_y, other=0.0)
        b32 = b_tile.to(tl.float32)
        out = y_tile.to(tl.float32)
        # Row by row against the one B slab in registers (a [ROWS, BLOCK_R, BLOCK_N] product
        # would not fit in them); each row's sum lands in its row of `out`, stored once.
        for m in tl.static_range(ROWS):
            v_m = _load_v_row(v_first + m * stride_vm, offs_r,
                              mask_r & (row_start + m < row_end), stride_vs, NUM_SPLITS) * scale
            acc_m = tl.sum(b32 * v_m[:, None], axis=0)
            out = tl.where((tl.arange(0, ROWS) == m)[:, None], out + acc_m[None, :], out)
        tl.store(y_rows + offs_n[None, :], out.to(y_ptr.dtype.element_ty), mask=mask_y)
        offs_n += BLOCK_N
        mask_n = offs_n < n_hi
        if PREFETCH:  # the next tile; after the program's last, nothing
            mask_next = mask_n & (i + 1 < tiles_per_program)
            b_tile = tl.load(b_rows + offs_n[None, :], mask=mask_r[:, None] & mask_next[None, :],
                             other=0.0)
            y_tile = tl.load(y_rows + offs_n[None, :], mask=mask_m[:, None] & mask_next[None, :],
                             other=0.0)
