"""Triton kernels of SGMV (segmented gather matrix-vector), the Punica LoRA ops.

Launch geometry (both kernels). Axis 0 enumerates *row tiles*: every segment with an adapter
(slot >= 0) is cut into ceil(len / BLOCK_M) tiles of at most BLOCK_M rows, and tiles are numbered
segment by segment. The grid is sized by a host-side upper bound, min(T, cdiv(T, BLOCK_M) + S),
so it never depends on device data: no host sync, and a CUDA graph can replay it for any
segmentation of the same T and S. Each program finds its tile with a vectorised prefix sum over the
segment table (`tiles.locate_tile`); programs past the last tile, and rank tiles past a slot's rank,
exit at once. So a batch of ranks 8, 16 and 64 does the work of those ranks, whatever the pool's
max rank.

Split-K shrink. Decode batches have one row per segment, too little parallelism to stream the A
weights at full bandwidth, so the shrink splits the `in` dimension over axis 2 and writes one fp32
partial per split into v[split]; the expand sums the partials while loading v (deterministic, no
atomics, no zero-fill launch). NUM_SPLITS is a compile-time constant,
so the loads of a tile's partials are unrolled and all in flight at once.

Optional reduction in the shrink (REDUCE): the last split program of each tile to finish (an
arrival counter per tile, self-resetting) sums the partials into one v, so the expand reads a
single tile instead of NUM_SPLITS (measured: the partial reads cost the expand 2-4 us at small
batches).

LoRA slices (sgmv_slices). Projections that read the same input and write side by side into one
fused output (q/k/v, gate/up) run as one shrink and one expand. With S slices of per-slice max
rank R: A_pool [num_slots, S*R, in] holds slice s in rows s*R.., v [splits, T, S*R] likewise,
B_pool [num_slots, R, out] holds slice s in the output columns [n_s, n_{s+1}), and ranks / scales
are [S, num_slots] (row stride `slice_stride`). The shrink's rank-tile axis enumerates
S x tiles_per_slice tiles; the expand's grid axis 2 is the slice. One slice: s = 0 everywhere.

Programmatic dependent launch (USE_PDL, Hopper). The shrink waits for the kernels before it
(`gdc_wait`) and then lets the expand launch, so the expand's launch and tile lookup (segment
table, ranks, scales: nothing the shrink writes) overlap the shrink; it waits before reading v.
Safe because the expand can start only once every shrink program has passed its own wait, i.e.
once all earlier kernels are done.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from punica.ops.tiles import locate_tile


@triton.jit
def fence_gpu():
    """fence.acq_rel.gpu in every thread: its earlier global writes are visible GPU-wide."""
    tl.inline_asm_elementwise("fence.acq_rel.gpu; // $0", "=r", [], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _reduce_splits(v_ptr, vout_ptr, counter_ptr, rows64, offs_r, mask, stride_vs, stride_vm,
                   stride_om, NUM_SPLITS: tl.constexpr, FENCE: tl.constexpr):
    """The last split program of a (row tile, rank tile) to arrive sums the partials into vout.

    Counter life cycle: 0 before the launch; each split program adds 1 after its partial is
    stored and fenced; the one that reads NUM_SPLITS - 1 reduces and puts it back to 0, so the
    counters are all 0 again for the next launch (the workspace is allocated zeroed).
    """
    if FENCE:
        fence_gpu()
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == NUM_SPLITS - 1:
        ptrs = v_ptr + rows64[:, None] * stride_vm + offs_r[None, :]
        total = tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
        for split in tl.static_range(1, NUM_SPLITS):
            total += tl.load(ptrs + split * stride_vs, mask=mask, other=0.0,
                             cache_modifier=".cg")
        tl.store(vout_ptr + rows64[:, None] * stride_om + offs_r[None, :], total, mask=mask)
        tl.atomic_xchg(counter_ptr, 0)


@triton.jit
def locate_adapter_tile(indptr_ptr, slots_ptr, ranks_ptr, num_segments, num_slots, max_rank,
                        pid, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr):
    """(ok, row_start, row_end, slot, rank) of row tile `pid` (BLOCK_M = 1: row `pid`) among the
    segments with an adapter; ok is false past the last tile or for a slot outside the pool,
    and the program then has nothing to do."""
    found, row_start, row_end, _, slot = locate_tile(
        indptr_ptr, slots_ptr, num_segments, pid, BLOCK_M, BLOCK_S, True)
    ok = found & (slot < num_slots)
    rank = tl.minimum(tl.load(ranks_ptr + slot, mask=ok, other=0), max_rank)
    return ok, row_start, row_end, slot, rank


@triton.jit
def slice_columns(ls, n1, n2, N):
    """[n_lo, n_hi) of LoRA slice `ls` among the output columns: [0, n1), [n1, n2), [n2, N)
    (one slice: n1 = N)."""
    n_lo = tl.where(ls == 0, 0, tl.where(ls == 1, n1, n2))
    n_hi = tl.where(ls == 0, n1, tl.where(ls == 1, n2, N))
    return n_lo, n_hi


@triton.jit
def sgmv_shrink_kernel(
    x_ptr, a_ptr, v_ptr, indptr_ptr, slots_ptr, ranks_ptr, vout_ptr, counters_ptr,
    num_segments, num_slots, max_rank, K, k_per_split, num_rank_tiles, tiles_per_slice,
    slice_stride, stride_xm, stride_as, stride_ar, stride_vs, stride_vm, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr, PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, USE_PDL: tl.constexpr, REDUCE: tl.constexpr,
    NUM_SPLITS: tl.constexpr, FENCE: tl.constexpr,
):
    """v[split, rows, r-tile] = x[rows, k-split] @ A[slot, r-tile, k-split].T  (fp32 partials);
    with REDUCE, also vout[rows, r-tile] = sum of the partials (by the last split to finish)."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
    ls = pid_r // tiles_per_slice  # the LoRA slice of this rank tile (see sgmv_slices)
    ok, row_start, row_end, slot, rank = locate_adapter_tile(
        indptr_ptr, slots_ptr, ranks_ptr + ls * slice_stride, num_segments, num_slots, max_rank,
        pid_m, BLOCK_M, BLOCK_S)
    if not ok:
        return
    r_start = (pid_r - ls * tiles_per_slice) * BLOCK_R
    if r_start >= rank:
        return
    offs_m = row_start + tl.arange(0, BLOCK_M)
    mask_r = r_start + tl.arange(0, BLOCK_R) < rank
    offs_r = ls * max_rank + r_start + tl.arange(0, BLOCK_R)  # rows of A, columns of v
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < row_end
    k_start = pid_k * k_per_split
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + (k_start + offs_k)[None, :]
    a_ptrs = (a_ptr + slot.to(tl.int64) * stride_as + offs_r[None, :] * stride_ar
              + (k_start + offs_k)[:, None])
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, k_per_split, BLOCK_K):
        mask_k = (k_start + k + offs_k) < K
        x_tile = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        a_tile = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        if DOT_IN_FP32:
            x_tile = x_tile.to(tl.float32)
            a_tile = a_tile.to(tl.float32)
        acc = tl.dot(x_tile, a_tile, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
    rows64 = offs_m.to(tl.int64)
    mask_v = mask_m[:, None] & mask_r[None, :]
    tl.store(v_ptr + pid_k * stride_vs + rows64[:, None] * stride_vm + offs_r[None, :], acc,
             mask=mask_v)
    if REDUCE:
        _reduce_splits(v_ptr, vout_ptr, counters_ptr + pid_m * num_rank_tiles + pid_r, rows64,
                       offs_r, mask_v, stride_vs, stride_vm, stride_om, NUM_SPLITS, FENCE)


@triton.jit
def _load_v(v_ptr, rows64, offs_r, mask, stride_vs, stride_vm, NUM_SPLITS: tl.constexpr):
    """sum over splits of v[split, rows, offs_r]: NUM_SPLITS independent loads, issued together."""
    ptrs = v_ptr + rows64[:, None] * stride_vm + offs_r[None, :]
    total = tl.load(ptrs, mask=mask, other=0.0)
    for split in tl.static_range(1, NUM_SPLITS):
        total += tl.load(ptrs + split * stride_vs, mask=mask, other=0.0)
    return total


@triton.jit
def sgmv_expand_kernel(
    v_ptr, b_ptr, y_ptr, indptr_ptr, slots_ptr, ranks_ptr, scales_ptr,
    num_segments, num_slots, max_rank, N, tiles_per_program, slice_stride, n1, n2,
    stride_vs, stride_vm, stride_bs, stride_br, stride_ym,
    NUM_SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """y[rows, n-tiles] += scale[slot] * v.sum(0)[rows, :rank] @ B[slot, :rank, n-tiles].

    One program: one row tile x `tiles_per_program` consecutive BLOCK_N column tiles, so the
    per-program work (tile lookup, v load) is amortised and the B / y loads pipeline.
    BLOCK_R >= max_rank: one rank tile; rows of B past the slot's rank are never loaded.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    ls = tl.program_id(2)  # the LoRA slice (see sgmv_slices)
    n_lo, n_hi = slice_columns(ls, n1, n2, N)
    n_first = n_lo + pid_n * tiles_per_program * BLOCK_N
    if n_first >= n_hi:
        return
    ok, row_start, row_end, slot, rank = locate_adapter_tile(
        indptr_ptr, slots_ptr, ranks_ptr + ls * slice_stride, num_segments, num_slots, max_rank,
        pid_m, BLOCK_M, BLOCK_S)
    if not ok:
        return
    scale = tl.load(scales_ptr + ls * slice_stride + slot)
    offs_m = row_start + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < row_end
    mask_r = offs_r < rank
    rows64 = offs_m.to(tl.int64)
    if USE_PDL:
        gdc_wait()  # v is the shrink's output: everything above it may overlap the shrink
    v_tile = _load_v(v_ptr + ls * max_rank, rows64, offs_r, mask_m[:, None] & mask_r[None, :],
                     stride_vs, stride_vm, NUM_SPLITS)
    b_rows = b_ptr + slot.to(tl.int64) * stride_bs + offs_r[:, None] * stride_br
    y_rows = y_ptr + rows64[:, None] * stride_ym
    for i in range(0, tiles_per_program):
        offs_n = n_first + i * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_hi
        b_tile = tl.load(b_rows + offs_n[None, :], mask=mask_r[:, None] & mask_n[None, :],
                         other=0.0)
        mask_y = mask_m[:, None] & mask_n[None, :]
        y_tile = tl.load(y_rows + offs_n[None, :], mask=mask_y, other=0.0)
        acc = tl.dot(v_tile, b_tile.to(tl.float32), input_precision=PRECISION)
        out = y_tile.to(tl.float32) + scale * acc
        tl.store(y_rows + offs_n[None, :], out.to(y_ptr.dtype.element_ty), mask=mask_y)
