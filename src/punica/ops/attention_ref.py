"""Pure-torch paged attention (prefill chunks and decodes in one call): the CPU path and oracle.

KV pool of one layer: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim]. Token t of
sequence b lives at block_tables[b, t // block_size], offset t % block_size. `slot_mapping[i]` is
the flat slot (block * block_size + offset) where row i's new K/V are written.
"""

from __future__ import annotations

import torch


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k_cache.view(-1, H_kv, D)[slot_mapping] = k (and v): k, v [T, H_kv, D]."""
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = k
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = v


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: list[int],
    seq_lens: list[int],
    block_tables: list[list[int]],
    scale: float,
) -> torch.Tensor:
    """out[rows of b] = softmax(q_b K_b^T * scale + causal) V_b per sequence b, fp32 inside.

    q [T, H, D]; sequence b owns rows cu_seqlens_q[b]:cu_seqlens_q[b+1], which are its last
    positions up to seq_lens[b] - 1 (its context, already written to the cache, is seq_lens[b]
    tokens). Grouped-query: query head h reads KV head h // (H / H_kv). Returns [T, H, D].
    """
    out = torch.empty_like(q)
    num_heads, num_kv = q.shape[1], k_cache.shape[2]
    group = num_heads // num_kv
    block_size = k_cache.shape[1]
    for b, ctx in enumerate(seq_lens):
        start, end = cu_seqlens_q[b], cu_seqlens_q[b + 1]
        n_q = end - start
        blocks = torch.tensor(block_tables[b][: -(-ctx // block_size)], device=q.device)
        keys = k_cache[blocks].reshape(-1, num_kv, k_cache.shape[3])[:ctx]
        vals = v_cache[blocks].reshape(-1, num_kv, v_cache.shape[3])[:ctx]
        keys = keys.repeat_interleave(group, dim=1).float()  # [ctx, H, D]
        vals = vals.repeat_interleave(group, dim=1).float()
        scores = torch.einsum("qhd,khd->hqk", q[start:end].float(), keys) * scale
        q_pos = torch.arange(ctx - n_q, ctx, device=q.device)[:, None]
        k_pos = torch.arange(ctx, device=q.device)[None, :]
        scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vals).to(q.dtype)
    return out
