"""Pure-torch reference of the SGMV LoRA ops (`punica.ops.lora`).

Semantics shared with the Triton kernels. A batch of T rows is cut into S segments; segment i owns
rows ``indptr[i]:indptr[i+1]`` and uses adapter slot ``slots[i]`` (-1: base model only, rows
untouched). Each slot ``w`` of a pool has rank ``ranks[w]`` (1..max_rank) and scale ``scales[w]``.

    A_pool: [num_slots, max_rank, in]   PEFT lora_A.weight [r, in] copied to A_pool[w, :r]
    B_pool: [num_slots, max_rank, out]  PEFT lora_B.weight [out, r], transposed, to B_pool[w, :r]
    v:      [num_splits, T, max_rank]   float32 split-K partials; the shrink result is v.sum(0)

These run on any device with host-side loops over segments (they read the metadata on the host), so
they are the CPU path of the engine and the oracle of the kernel tests.
"""

from __future__ import annotations

import torch


def _segments(indptr: torch.Tensor, slots: torch.Tensor) -> list[tuple[int, int, int]]:
    bounds = indptr.tolist()
    return [(bounds[i], bounds[i + 1], w) for i, w in enumerate(slots.tolist())]


def sgmv_shrink_ref(
    x: torch.Tensor,
    A_pool: torch.Tensor,
    indptr: torch.Tensor,
    slots: torch.Tensor,
    ranks: torch.Tensor,
    v: torch.Tensor,
) -> torch.Tensor:
    """v.sum(0)[s:e, :r] = x[s:e].float() @ A_pool[w, :r].float().T   for each segment (s, e, w>=0).

    x [T, in], A_pool [num_slots, max_rank, in], v [num_splits, T, max_rank] fp32 (written; entries
    of base-only rows and of columns >= the slot's rank are left as they were). Returns v.
    """
    rank_of = ranks.tolist()
    for start, end, slot in _segments(indptr, slots):
        if slot < 0 or end <= start:
            continue
        r = rank_of[slot]
        v[:, start:end, :r] = 0.0
        v[0, start:end, :r] = x[start:end].float() @ A_pool[slot, :r].float().T
    return v


def sgmv_expand_ref(
    v: torch.Tensor,
    B_pool: torch.Tensor,
    indptr: torch.Tensor,
    slots: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    y: torch.Tensor,
) -> torch.Tensor:
    """y[s:e] += scales[w] * v.sum(0)[s:e, :r] @ B_pool[w, :r].float()   for each segment (w>=0).

    v [num_splits, T, max_rank] fp32, B_pool [num_slots, max_rank, out], y [T, out] updated in
    place (the sum is formed in fp32 and rounded once to y's dtype). Returns y.
    """
    rank_of = ranks.tolist()
    scale_of = scales.tolist()
    for start, end, slot in _segments(indptr, slots):
        if slot < 0 or end <= start:
            continue
        r = rank_of[slot]
        delta = v[:, start:end, :r].sum(0) @ B_pool[slot, :r].float()
        y[start:end] = (y[start:end].float() + scale_of[slot] * delta).to(y.dtype)
    return y


def add_lora_ref(
    y: torch.Tensor,
    x: torch.Tensor,
    A_pool: torch.Tensor,
    B_pool: torch.Tensor,
    indptr: torch.Tensor,
    slots: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    slices: tuple[int, ...] = (),
) -> torch.Tensor:
    """y[s:e] += scales[w] * (x[s:e] @ A_pool[w, :r].T) @ B_pool[w, :r] per segment, in fp32.

    With LoRA slices (output widths; see `lora.add_lora`), each slice on its own: rows
    s*R:(s+1)*R of A_pool, its columns of B_pool and y, ranks[s] and scales[s]."""
    if slices:
        R, start = B_pool.shape[1], 0
        for s, width in enumerate(slices):
            add_lora_ref(y[:, start:start + width], x, A_pool[:, s * R:(s + 1) * R],
                         B_pool[:, :, start:start + width], indptr, slots, ranks[s], scales[s])
            start += width
        return y
    v = torch.zeros(1, x.shape[0], A_pool.shape[1], dtype=torch.float32, device=x.device)
    sgmv_shrink_ref(x, A_pool, indptr, slots, ranks, v)
    return sgmv_expand_ref(v, B_pool, indptr, slots, ranks, scales, y)
