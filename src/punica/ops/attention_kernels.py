"""Triton kernels of paged attention over the KV pool [num_blocks, block_size, kv_heads, head_dim].

- `kv_write_kernel`: row t's K and V go to flat slot slot_mapping[t] (negative: skipped).
- `rotary_kv_write_kernel`: q and k of row t rotated in place by position positions[t], then K
  and V written as `kv_write_kernel` does (one launch instead of three per layer).
- `paged_prefill_kernel`: varlen causal attention of each sequence's new query rows (a prefill
  chunk, or one decode row) over its whole cached context; program = (row tile, query head); row
  tiles located as in SGMV (`tiles.locate_tile`); online softmax in fp32.
- `paged_decode_kernel`: one query row per sequence; program = (sequence, KV head, KV split); the
  GROUP query heads that share a KV head are handled together, so each K/V tile is read once.
  With several splits each program writes a partial output and its log-sum-exp, merged either
  by `decode_reduce_kernel` or, with MERGE_IN_KERNEL, by the sequence's last split to finish
  (an int32 counter per (sequence, KV head) counts the finished splits; the merger sets it back
  to 0, so the counters are all 0 between launches, as a CUDA graph's replays need). There a
  split of fixed length `tokens_per_split` is active only where the context reaches it, and a
  context of one split writes `out` itself: short contexts cost what an unsplit launch costs,
  long ones spread over several programs instead of one (a batch of mixed lengths no longer
  waits on its longest sequence's one program).
Token t of sequence b is read from block block_tables[b, t // BLOCK_SIZE] at offset
t % BLOCK_SIZE.
"""

from __future__ import annotations

import triton
import triton.language as tl

from punica.ops.lora_kernels import fence_gpu
from punica.ops.tiles import locate_tile


@triton.jit
def kv_write_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
                    stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ch,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    if slot < 0:
        return
    d = tl.arange(0, BLOCK_D)
    mask = d < HEAD_DIM
    dst = slot * stride_cs + h * stride_ch + d
    tl.store(k_cache_ptr + dst, tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask),
             mask=mask)
    tl.store(v_cache_ptr + dst, tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask),
             mask=mask)


@triton.jit
def _rotate_heads(x_row_ptr, heads, num_heads, stride_h, offs, cos, sin, HALF: tl.constexpr):
    """Rotate heads `heads` of one row in place (rotate-half form); returns the two rotated
    halves and the heads' mask."""
    mask = (heads < num_heads)[:, None]
    ptrs = x_row_ptr + heads[:, None] * stride_h + offs[None, :]
    x1 = tl.load(ptrs, mask=mask, other=0.0)
    x2 = tl.load(ptrs + HALF, mask=mask, other=0.0)
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    r1 = (f1 * cos - f2 * sin).to(x1.dtype)
    r2 = (f2 * cos + f1 * sin).to(x1.dtype)
    tl.store(ptrs, r1, mask=mask)
    tl.store(ptrs + HALF, r2, mask=mask)
    return r1, r2, mask


@triton.jit
def rotary_kv_write_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, k_cache_ptr,
                           v_cache_ptr, slot_mapping_ptr, num_heads, num_kv_heads, q_programs,
                           stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                           stride_c, stride_cs, stride_ch,
                           HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """Program (t, j): j < q_programs rotates BLOCK_H query heads of row t; the others rotate
    BLOCK_H KV heads of k and store them, with v's, at slot slot_mapping[t] (if >= 0)."""
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    offs = tl.arange(0, HALF)
    pos = tl.load(pos_ptr + t)
    cos = tl.load(cos_ptr + pos * stride_c + offs)[None, :]
    sin = tl.load(sin_ptr + pos * stride_c + offs)[None, :]
    if j < q_programs:
        heads = j * BLOCK_H + tl.arange(0, BLOCK_H)
        _rotate_heads(q_ptr + t * stride_qt, heads, num_heads, stride_qh, offs, cos, sin, HALF)
    else:
        heads = (j - q_programs) * BLOCK_H + tl.arange(0, BLOCK_H)
        k1, k2, mask = _rotate_heads(k_ptr + t * stride_kt, heads, num_kv_heads, stride_kh,
                                     offs, cos, sin, HALF)
        slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
        if slot >= 0:
            dst = slot * stride_cs + heads[:, None] * stride_ch + offs[None, :]
            tl.store(k_cache_ptr + dst, k1, mask=mask)
            tl.store(k_cache_ptr + dst + HALF, k2, mask=mask)
            v_src = v_ptr + t * stride_vt + heads[:, None] * stride_vh + offs[None, :]
            tl.store(v_cache_ptr + dst, tl.load(v_src, mask=mask), mask=mask)
            tl.store(v_cache_ptr + dst + HALF, tl.load(v_src + HALF, mask=mask), mask=mask)


@triton.jit
def _kv_tile(cache_ptr, table_row_ptr, toks, mask_n, kv_head, d, mask_d, stride_cb, stride_ct,
             stride_ch, BLOCK_SIZE: tl.constexpr):
    """[BLOCK_N, BLOCK_D] tile of K or V for token positions `toks` of one sequence."""
    blocks = tl.load(table_row_ptr + toks // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
    offs = blocks * stride_cb + (toks % BLOCK_SIZE) * stride_ct + kv_head * stride_ch
    return tl.load(cache_ptr + offs[:, None] + d[None, :], mask=mask_n[:, None] & mask_d[None, :],
                   other=0.0)


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """Fold one tile of scores s [M, N] (fp32, -inf masked) and values v [N, D] into the state."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if DOT_FP32:
        pv = tl.dot(p, v.to(tl.float32), input_precision=PRECISION)
    else:
        pv = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def _attend(q, pos, k_cache_ptr, v_cache_ptr, table, begin, end, kv_head, d, mask_d, scale,
            stride_cb, stride_ct, stride_ch, ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, CAUSAL: tl.constexpr,
            PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """Online softmax of q [ROWS, D] over keys begin .. end-1 (CAUSAL: key <= pos of the row).

    Returns (acc, m, l): unnormalised output, running max and sum of exponentials.
    """
    m_i = tl.full((ROWS,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((ROWS,), dtype=tl.float32)
    acc = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
    for start in range(begin, end, BLOCK_N):
        toks = start + tl.arange(0, BLOCK_N)
        mask_n = toks < end
        k = _kv_tile(k_cache_ptr, table, toks, mask_n, kv_head, d, mask_d, stride_cb, stride_ct,
                     stride_ch, BLOCK_SIZE)
        v = _kv_tile(v_cache_ptr, table, toks, mask_n, kv_head, d, mask_d, stride_cb, stride_ct,
                     stride_ch, BLOCK_SIZE)
        if DOT_FP32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
        visible = mask_n[None, :]
        if CAUSAL:
            visible = visible & (toks[None, :] <= pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, PRECISION, DOT_FP32)
    return acc, m_i, l_i


@triton.jit
def paged_prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, cu_q_ptr, seq_lens_ptr, block_tables_ptr,
    num_seqs, scale,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_ct, stride_ch, stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_S: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """out[rows, h] = softmax(q K^T * scale, causal) V for one row tile and query head h."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    found, row_start, row_end, b, _ = locate_tile(cu_q_ptr, cu_q_ptr, num_seqs, pid_m, BLOCK_M,
                                                  BLOCK_S, False)
    if not found:
        return
    ctx = tl.load(seq_lens_ptr + b)
    q_end = tl.load(cu_q_ptr + b + 1)
    rows = row_start + tl.arange(0, BLOCK_M)
    mask_m = rows < row_end
    pos = ctx - (q_end - rows)  # position of each query row in its sequence
    d = tl.arange(0, BLOCK_D)
    mask_d = d < HEAD_DIM
    q = tl.load(q_ptr + rows.to(tl.int64)[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    kv_head = h // GROUP
    table = block_tables_ptr + b.to(tl.int64) * stride_bt
    last = ctx - (q_end - row_end)  # keys 0 .. last - 1 are visible to some row of the tile
    acc, m_i, l_i = _attend(q, pos, k_cache_ptr, v_cache_ptr, table, 0, last, kv_head, d,
                            mask_d, scale, stride_cb, stride_ct, stride_ch, BLOCK_M, BLOCK_D,
                            BLOCK_N, BLOCK_SIZE, True, PRECISION, DOT_FP32)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_ot + h * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


@triton.jit
def paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_lse_ptr, seq_lens_ptr,
    block_tables_ptr, counters_ptr, scale, tokens_per_split,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_ct, stride_ch, stride_bt,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_nb,
    GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    MERGE_IN_KERNEL: tl.constexpr, FENCE: tl.constexpr, PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """One sequence's query heads of one KV head, over one split of its context."""
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(seq_lens_ptr + b)
    if MERGE_IN_KERNEL:
        if split > 0 and split * tokens_per_split >= ctx:
            return  # a split past the context: nothing to read or write
    g = tl.arange(0, GROUP_P2)
    mask_g = g < GROUP
    heads = kv_head * GROUP + g
    d = tl.arange(0, BLOCK_D)
    mask_d = d < HEAD_DIM
    mask_q = mask_g[:, None] & mask_d[None, :]
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=mask_q, other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    table = block_tables_ptr + b.to(tl.int64) * stride_bt
    begin = split * tokens_per_split
    end = tl.minimum(ctx, begin + tokens_per_split)
    acc, m_i, l_i = _attend(q, g, k_cache_ptr, v_cache_ptr, table, begin, end, kv_head, d,
                            mask_d, scale, stride_cb, stride_ct, stride_ch, GROUP_P2, BLOCK_D,
                            BLOCK_N, BLOCK_SIZE, False, PRECISION, DOT_FP32)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out_ptrs = out_ptr + b.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + d[None, :]
    # splits holding context tokens (a context past NUM_SPLITS runs, outside the contract, is
    # cut there rather than leaving a merge waiting for programs that do not exist)
    active = tl.minimum(tl.maximum(tl.cdiv(ctx, tokens_per_split), 1), NUM_SPLITS)
    if NUM_SPLITS == 1:
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_q)
    elif not MERGE_IN_KERNEL:  # every split, empty ones too (lse -inf: weight 0 in the reduce)
        _store_partial(out, m_i, l_i, part_out_ptr, part_lse_ptr, b, split, heads, mask_g, d,
                       mask_q, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh)
    elif active == 1:
        if split == 0:
            tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_q)
    elif split < active:
        _store_partial(out, m_i, l_i, part_out_ptr, part_lse_ptr, b, split, heads, mask_g, d,
                       mask_q, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh)
        # every thread's partial stores are fenced GPU-wide (FENCE: off in the interpreter) and
        # precede the counter increment; the program that sees active - 1 finished before it
        # merges, then resets the counter (the SGMV shrink's reduce does the same)
        if FENCE:
            fence_gpu()
        tl.debug_barrier()
        counter = counters_ptr + b.to(tl.int64) * stride_nb + kv_head
        done = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if done == active - 1:
            merged = _merge_splits(part_out_ptr, part_lse_ptr, b, heads, mask_g, d, mask_q,
                                   active, stride_pb, stride_ph, stride_ps, stride_lb,
                                   stride_lh, GROUP_P2, BLOCK_D)
            tl.store(out_ptrs, merged.to(out_ptr.dtype.element_ty), mask=mask_q)
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")


@triton.jit
def _store_partial(out, m_i, l_i, part_out_ptr, part_lse_ptr, b, split, heads, mask_g, d,
                   mask_q, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh):
    """part_out[b, heads, split] = out (normalised), part_lse[b, heads, split] = m + log(l)."""
    lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
    base = b.to(tl.int64) * stride_pb + split * stride_ps
    tl.store(part_out_ptr + base + heads[:, None] * stride_ph + d[None, :], out, mask=mask_q)
    tl.store(part_lse_ptr + b.to(tl.int64) * stride_lb + heads * stride_lh + split, lse,
             mask=mask_g)


@triton.jit
def _merge_splits(part_out_ptr, part_lse_ptr, b, heads, mask_g, d, mask_q, active, stride_pb,
                  stride_ph, stride_ps, stride_lb, stride_lh, GROUP_P2: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """sum_s w_s * part_out[b, heads, s] over the active splits, w = softmax of their lse (read
    past the L1: other programs wrote them)."""
    m = tl.full((GROUP_P2,), float("-inf"), dtype=tl.float32)
    l_sum = tl.zeros((GROUP_P2,), dtype=tl.float32)
    acc = tl.zeros((GROUP_P2, BLOCK_D), dtype=tl.float32)
    for s in range(0, active):
        lse = tl.load(part_lse_ptr + b.to(tl.int64) * stride_lb + heads * stride_lh + s,
                      mask=mask_g, other=float("-inf"), cache_modifier=".cg")
        part = tl.load(part_out_ptr + b.to(tl.int64) * stride_pb + s * stride_ps +
                       heads[:, None] * stride_ph + d[None, :], mask=mask_q, other=0.0,
                       cache_modifier=".cg")
        m_new = tl.maximum(m, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        w = tl.exp(lse - m_safe)
        acc = acc * alpha[:, None] + w[:, None] * part
        l_sum = l_sum * alpha + w
        m = m_new
    return acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]


@triton.jit
def decode_reduce_kernel(part_out_ptr, part_lse_ptr, out_ptr, stride_pb, stride_ph, stride_ps,
                         stride_lb, stride_lh, stride_ot, stride_oh, NUM_SPLITS: tl.constexpr,
                         SPLITS_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """out[b, h] = sum_s w_s * part_out[b, h, s] with w = softmax over splits of their lse."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_P2)
    mask_s = s < NUM_SPLITS
    d = tl.arange(0, BLOCK_D)
    mask_d = d < HEAD_DIM
    base = b.to(tl.int64) * stride_pb + h * stride_ph
    lse = tl.load(part_lse_ptr + b.to(tl.int64) * stride_lb + h * stride_lh + s, mask=mask_s,
                  other=float("-inf"))
    w = tl.exp(lse - tl.max(lse, axis=0))
    w = tl.where(mask_s, w, 0.0)
    parts = tl.load(part_out_ptr + base + s[:, None] * stride_ps + d[None, :],
                    mask=mask_s[:, None] & mask_d[None, :], other=0.0)
    out = tl.sum(w[:, None] * parts, axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + b.to(tl.int64) * stride_ot + h * stride_oh + d, out.to(
        out_ptr.dtype.element_ty), mask=mask_d)
