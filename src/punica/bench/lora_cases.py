"""Benchmark problems of the LoRA op: pools, rotating inputs and the peers (loop, gather-BMM).

Each case lays out `num_rotations` independent calls (own slots, x, y) whose bytes add up to several
times the L2, so replaying them back to back times every call with cold weights.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from punica.bench.workloads import indptr_of, segment_lengths
from punica.ops import lora


@dataclass(frozen=True)
class Case:
    mix: str
    bs: int
    rank: int


@dataclass
class Call:
    """One call's inputs: a batch of `bs` rows over its own adapters."""

    x: torch.Tensor
    y: torch.Tensor
    indptr: torch.Tensor
    slots: torch.Tensor
    segments: list[tuple[int, int, int]]  # host copy (start, end, slot) for the loop baseline
    row_slots: torch.Tensor  # [bs] int64, for gather-BMM


@dataclass
class Bench:
    case: Case
    A: torch.Tensor
    B: torch.Tensor
    ranks: torch.Tensor
    scales: torch.Tensor
    scales_host: list[float]
    calls: list[Call]
    workspace: torch.Tensor

    @property
    def num_adapters(self) -> int:
        return len(self.calls[0].segments)

    def floor_bytes(self, in_f: int, out_f: int, dtype_bytes: int = 2) -> int:
        """Each used adapter's A and B read once, x read, y read and written."""
        weights = self.num_adapters * self.case.rank * (in_f + out_f)
        acts = self.case.bs * (in_f + 2 * out_f)
        return (weights + acts) * dtype_bytes


def build(case: Case, in_f: int, out_f: int, dtype: torch.dtype, l2_bytes: int,
          device: str = "cuda", max_rotations: int = 128) -> Bench:
    lengths = segment_lengths(case.mix, case.bs)
    per_call = (len(lengths) * case.rank * (in_f + out_f) + case.bs * (in_f + 2 * out_f)) * 2
    rotations = min(max_rotations, max(4, math.ceil(4 * l2_bytes / per_call)))
    num_slots = rotations * len(lengths)
    dev = torch.device(device)
    A = torch.randn(num_slots, case.rank, in_f, device=dev, dtype=dtype) * in_f**-0.5
    B = torch.randn(num_slots, case.rank, out_f, device=dev, dtype=dtype) * 0.1
    ranks = torch.full((num_slots,), case.rank, dtype=torch.int32, device=dev)
    scales = torch.rand(num_slots, device=dev) + 0.5
    calls = []
    for rot in range(rotations):
        slot_ids = list(range(rot * len(lengths), (rot + 1) * len(lengths)))
        bounds = indptr_of(lengths)
        segments = [(bounds[i], bounds[i + 1], w) for i, w in enumerate(slot_ids)]
        row_slots = [w for (s, e, w) in segments for _ in range(e - s)]
        calls.append(Call(
            x=torch.randn(case.bs, in_f, device=dev, dtype=dtype),
            y=torch.randn(case.bs, out_f, device=dev, dtype=dtype),
            indptr=torch.tensor(bounds, dtype=torch.int32, device=dev),
            slots=torch.tensor(slot_ids, dtype=torch.int32, device=dev),
            segments=segments,
            row_slots=torch.tensor(row_slots, dtype=torch.int64, device=dev),
        ))
    workspace = torch.zeros(lora.workspace_numel(case.bs, case.rank), device=dev)
    return Bench(case, A, B, ranks, scales, scales.tolist(), calls, workspace)


def ours(b: Bench, c: Call, shrink: lora.ShrinkConfig | None = None,
         expand: lora.ExpandConfig | None = None, reduce: bool = False,
         pdl: bool = True) -> None:
    """Punica's SGMV: shrink + expand (default launch configs unless given; `reduce`: the
    partials summed inside the shrink; `pdl=False`: neither kernel launched with programmatic
    dependent launch, the default configs otherwise)."""
    if not pdl:
        T, R = c.x.shape[0], b.A.shape[1]
        shrink = dataclasses.replace(
            shrink or lora.shrink_config(T, c.slots.numel(), c.x.shape[1], R), use_pdl=False)
        expand = dataclasses.replace(
            expand or lora.expand_config(T, c.slots.numel(), c.y.shape[1], R), use_pdl=False)
    if expand is None and (shrink is None or reduce):
        if reduce:
            T, R = c.x.shape[0], b.A.shape[1]
            shrink = dataclasses.replace(
                shrink or lora.shrink_config(T, c.slots.numel(), c.x.shape[1], R), reduce=True)
        lora.add_lora(c.y, c.x, b.A, b.B, c.indptr, c.slots, b.ranks, b.scales, b.workspace,
                      shrink=shrink)
        return
    T = c.x.shape[0]
    shrink = shrink or lora.shrink_config(T, c.slots.numel(), c.x.shape[1], b.A.shape[1])
    expand = expand or dataclasses.replace(
        lora.expand_config(T, c.slots.numel(), c.y.shape[1], b.A.shape[1]), use_pdl=None)
    v = b.workspace[: shrink.num_splits * T * b.A.shape[1]].view(shrink.num_splits, T, -1)
    lora.sgmv_shrink(c.x, b.A, c.indptr, c.slots, b.ranks, v, shrink)
    lora.sgmv_expand(v, b.B, c.indptr, c.slots, b.ranks, b.scales, c.y, expand)


def loop(b: Bench, c: Call) -> None:
    """Peer: a Python loop over adapters, two matmuls each."""
    for start, end, w in c.segments:
        c.y[start:end] += b.scales_host[w] * ((c.x[start:end] @ b.A[w].T) @ b.B[w])


def gather_bmm(b: Bench, c: Call) -> None:
    """Peer: gather each row's A and B, then two batched matmuls (torch.bmm)."""
    a = b.A[c.row_slots]  # [bs, r, in]
    bw = b.B[c.row_slots]  # [bs, r, out]
    v = torch.bmm(c.x.unsqueeze(1), a.transpose(1, 2))  # [bs, 1, r]
    scale = b.scales[c.row_slots].to(c.y.dtype)[:, None]
    c.y += torch.bmm(v, bw).squeeze(1) * scale
