"""Random SGMV problems for the kernel tests: pools, segment tables and reference results."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from punica.bench.workloads import indptr_of, segment_lengths

RANK_CHOICES = (1, 8, 16, 32, 64, 128)
# ||kernel - reference|| / ||reference|| bounds. fp16/bf16: a few output roundings (2^-11, 2^-8).
REL_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


@dataclass
class Problem:
    x: torch.Tensor
    y0: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    indptr: torch.Tensor
    slots: torch.Tensor
    ranks: torch.Tensor
    scales: torch.Tensor

    @property
    def max_rank(self) -> int:
        return self.A.shape[1]

    def segments(self) -> list[tuple[int, int, int]]:
        b = self.indptr.tolist()
        return [(b[i], b[i + 1], w) for i, w in enumerate(self.slots.tolist())]

    def touched_rows(self) -> torch.Tensor:
        mask = torch.zeros(self.x.shape[0], dtype=torch.bool)
        for start, end, slot in self.segments():
            mask[start:end] = slot >= 0
        return mask

    def v_mask(self) -> torch.Tensor:
        """[T, max_rank]: entries of v the shrink defines (rows with an adapter, cols < rank)."""
        mask = torch.zeros(self.x.shape[0], self.max_rank, dtype=torch.bool)
        rank_of = self.ranks.tolist()
        for start, end, slot in self.segments():
            if slot >= 0:
                mask[start:end, : rank_of[slot]] = True
        return mask


def make_problem(
    gen: torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
    lengths: list[int],
    in_features: int,
    out_features: int,
    max_rank: int,
    slot_ranks: list[int],
    base_only_every: int = 0,
) -> Problem:
    """Segments of `lengths`, each on its own random slot (skip-slot -1 every `base_only_every`)."""
    num_slots = len(slot_ranks)
    num_tokens = sum(lengths)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)

    order = torch.randperm(num_slots, generator=gen).tolist()
    slots = [order[i % num_slots] for i in range(len(lengths))]
    if base_only_every:
        slots = [-1 if i % base_only_every == 1 else w for i, w in enumerate(slots)]
    i32 = dict(dtype=torch.int32, device=device)
    # B rows scaled by 1/sqrt(rank): every slot's delta is O(1), large beside y0 whatever its rank.
    b_scale = torch.tensor([r**-0.5 for r in slot_ranks])[:, None, None]
    return Problem(
        x=randn(num_tokens, in_features),
        y0=randn(num_tokens, out_features, scale=0.05),
        A=randn(num_slots, max_rank, in_features, scale=in_features**-0.5),
        B=(torch.randn(num_slots, max_rank, out_features, generator=gen) * b_scale).to(dtype)
        .to(device),
        indptr=torch.tensor(indptr_of(lengths), **i32),
        slots=torch.tensor(slots, **i32),
        ranks=torch.tensor(slot_ranks, **i32),
        scales=(torch.rand(num_slots, generator=gen) * 2 + 0.25).to(device),
    )


def mixed_ranks(gen: torch.Generator, num_slots: int, max_rank: int) -> list[int]:
    """Random ranks from RANK_CHOICES up to max_rank, always including 1 and max_rank."""
    allowed = [r for r in RANK_CHOICES if r <= max_rank] or [max_rank]
    picks = torch.randint(len(allowed), (num_slots,), generator=gen).tolist()
    ranks = [allowed[i] for i in picks]
    ranks[0] = max_rank
    if num_slots > 1:
        ranks[1] = 1
    return ranks


def problem_for_mix(gen: torch.Generator, device: torch.device, dtype: torch.dtype, mix: str,
                    bs: int, in_features: int, out_features: int, max_rank: int) -> Problem:
    lengths = segment_lengths(mix, bs)
    num_slots = max(len(lengths), 2)
    return make_problem(gen, device, dtype, lengths, in_features, out_features, max_rank,
                        mixed_ranks(gen, num_slots, max_rank), base_only_every=3)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.double().cpu(), ref.double().cpu()
    denom = ref64.norm().item()
    return (out64 - ref64).norm().item() / max(denom, 1e-30)


def seed_of(*parts: object) -> int:
    """A stable seed per test case (Python's str hash changes between processes)."""
    return zlib.crc32(repr(parts).encode())
