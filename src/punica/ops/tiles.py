"""Row-tile lookup shared by the segmented kernels (SGMV, paged prefill).

A batch's rows are cut into segments by `indptr` (segment i: rows indptr[i]:indptr[i+1]); each
segment is cut into ceil(len / BLOCK_M) tiles, numbered segment by segment. With USE_SLOTS,
segments whose slot is negative get no tiles. Launch grids use the host-side bound
min(T, cdiv(T, BLOCK_M) + S) on the tile count, so they never depend on device data.
"""

from __future__ import annotations

import triton
import triton.language as tl

from punica.ops.launch import cdiv, next_power_of_2


@triton.jit
def locate_tile(indptr_ptr, slots_ptr, num_segments, pid, BLOCK_M: tl.constexpr,
                BLOCK_S: tl.constexpr, USE_SLOTS: tl.constexpr):
    """(found, row_start, row_end, segment, slot) of row tile `pid`; found is false past the end.

    One vectorised pass: load the segment table (BLOCK_S >= num_segments), prefix-sum the tile
    counts, pick the segment whose tiles cover `pid`.
    """
    seg_ids = tl.arange(0, BLOCK_S)
    in_table = seg_ids < num_segments
    starts = tl.load(indptr_ptr + seg_ids, mask=in_table, other=0)
    ends = tl.load(indptr_ptr + seg_ids + 1, mask=in_table, other=0)
    lengths = tl.maximum(ends - starts, 0)
    tiles = (lengths + BLOCK_M - 1) // BLOCK_M
    if USE_SLOTS:
        seg_slots = tl.load(slots_ptr + seg_ids, mask=in_table, other=-1)
        tiles = tl.where(seg_slots >= 0, tiles, 0)
    else:
        seg_slots = tl.zeros((BLOCK_S,), dtype=tl.int32)
    tiles_end = tl.cumsum(tiles, axis=0)
    found = pid < tl.sum(tiles, axis=0)
    seg = tl.sum((tiles_end <= pid).to(tl.int32), axis=0)
    here = seg_ids == seg
    tile_in_seg = pid - tl.sum(tl.where(here, tiles_end - tiles, 0), axis=0)
    row_start = tl.sum(tl.where(here, starts, 0), axis=0) + tile_in_seg * BLOCK_M
    row_end = tl.sum(tl.where(here, ends, 0), axis=0)
    slot = tl.sum(tl.where(here, seg_slots, 0), axis=0)
    return found, row_start, row_end, seg, slot


def grid_rows(num_tokens: int, num_segments: int, block_m: int) -> int:
    """Upper bound on the number of row tiles (each tile holds >= 1 row)."""
    return min(num_tokens, cdiv(num_tokens, block_m) + num_segments)


def block_s(num_segments: int) -> int:
    return max(16, next_power_of_2(num_segments))
