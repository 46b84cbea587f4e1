"""LoRA slices: one add_lora for projections written side by side (fused q/k/v, gate/up).

Each case builds S independent single-projection problems (own pools, ranks incl. 0 for a
projection an adapter leaves alone, scales), fuses them into the sliced layout (A rows side by
side, B and y columns side by side, [S, num_slots] ranks/scales), runs the sliced add_lora (Triton:
interpreter on CPU, native on a GPU) and compares every slice with the single-projection torch
reference on its own columns. Row kernels (decode-shaped batches) and tile kernels (long segments),
with and without the in-shrink reduction.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from punica.bench.workloads import indptr_of, segment_lengths
from punica.ops import lora
from punica.ops.lora_ref import add_lora_ref
from tests.ops.lora_cases import REL_TOL, rel_err, seed_of

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class Sliced:
    x: torch.Tensor
    y0: torch.Tensor
    A: torch.Tensor  # [slots, S*R, in]
    B: torch.Tensor  # [slots, R, sum(widths)]
    indptr: torch.Tensor
    slots: torch.Tensor
    ranks: torch.Tensor  # [S, slots]
    scales: torch.Tensor  # [S, slots]
    widths: tuple[int, ...]

    def reference(self) -> torch.Tensor:
        """Each slice by the single-projection reference, on the CPU in fp32."""
        y = self.y0.cpu().float().clone()
        R, start = self.B.shape[1], 0
        for s, w in enumerate(self.widths):
            add_lora_ref(y[:, start:start + w], self.x.cpu().float(),
                         self.A[:, s * R:(s + 1) * R].cpu().float(),
                         self.B[:, :, start:start + w].cpu().float(), self.indptr.cpu(),
                         self.slots.cpu(), self.ranks[s].cpu(), self.scales[s].cpu())
            start += w
        return y


def make_sliced(gen: torch.Generator, device: torch.device, dtype: torch.dtype, mix: str,
                bs: int, widths: tuple[int, ...], max_rank: int, in_features: int = 48,
                ) -> Sliced:
    lengths = segment_lengths(mix, bs)
    num_slots = max(len(lengths), 2) + 1
    S = len(widths)
    # ranks per (slice, slot): any of 0..max_rank, the first slot at max_rank in every slice
    ranks = torch.randint(0, max_rank + 1, (S, num_slots), generator=gen)
    ranks[:, 0] = max_rank
    order = torch.randperm(num_slots, generator=gen).tolist()
    slots = [order[i % num_slots] for i in range(len(lengths))]
    slots = [-1 if i % 4 == 2 else w for i, w in enumerate(slots)]  # some base-only rows

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)

    i32 = dict(dtype=torch.int32, device=device)
    return Sliced(
        x=randn(sum(lengths), in_features),
        y0=randn(sum(lengths), sum(widths), scale=0.05),
        A=randn(num_slots, S * max_rank, in_features, scale=in_features**-0.5),
        B=randn(num_slots, max_rank, sum(widths), scale=max_rank**-0.5),
        indptr=torch.tensor(indptr_of(lengths), **i32),
        slots=torch.tensor(slots, **i32),
        ranks=ranks.to(**i32),
        scales=(torch.rand(S, num_slots, generator=gen) * 2 + 0.25).to(device),
        widths=widths)


def run(p: Sliced, reduce: bool = False) -> torch.Tensor:
    y = p.y0.clone()
    R, S = p.B.shape[1], len(p.widths)
    workspace = torch.zeros(lora.workspace_numel(p.x.shape[0], R, S), device=p.x.device)
    shrink = None
    if reduce:
        shrink = lora.shrink_config(p.x.shape[0], p.slots.numel(), p.x.shape[1], R, S)
        shrink = type(shrink)(**{**shrink.__dict__, "reduce": True, "num_splits": 2})
    lora.add_lora(y, p.x, p.A, p.B, p.indptr, p.slots, p.ranks, p.scales, workspace,
                  shrink=shrink, slices=p.widths)
    return y


def assert_close(p: Sliced, y: torch.Tensor) -> None:
    want = p.reference()
    assert rel_err(y.float(), want) < REL_TOL[p.x.dtype] * 2
    rows = torch.zeros(p.x.shape[0], dtype=torch.bool)
    b = p.indptr.tolist()
    for i, w in enumerate(p.slots.tolist()):
        rows[b[i]:b[i + 1]] = w >= 0
    assert torch.equal(y.cpu()[~rows], p.y0.cpu()[~rows])  # base-only rows untouched


@pytest.mark.parametrize("widths", ((40, 24, 24), (33, 70)), ids=str)
@pytest.mark.parametrize("mix", ("distinct", "uniform", "skewed", "identical"))
@pytest.mark.parametrize("bs", (1, 6, 40))
def test_sliced_add_lora_matches_each_projection(device: torch.device, bs: int, mix: str,
                                                widths: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(seed_of("slices", bs, mix, widths))
    p = make_sliced(gen, device, torch.float16, mix, bs, widths, max_rank=16)
    assert_close(p, run(p))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("max_rank", (8, 24, 64))
def test_sliced_ranks_and_dtypes(device: torch.device, dtype: torch.dtype, max_rank: int) -> None:
    gen = torch.Generator().manual_seed(seed_of("slice-ranks", dtype, max_rank))
    p = make_sliced(gen, device, dtype, "skewed", 9, (32, 16, 16), max_rank)
    assert_close(p, run(p))


@pytest.mark.parametrize("bs", (5, 160))  # row kernels, tile kernels
def test_sliced_reduce_in_shrink(device: torch.device, bs: int) -> None:
    gen = torch.Generator().manual_seed(seed_of("slice-reduce", bs))
    p = make_sliced(gen, device, torch.float32, "uniform", bs, (24, 40), max_rank=16)
    assert_close(p, run(p, reduce=True))


def test_long_segments_take_the_tile_kernels() -> None:
    assert lora.shrink_config(160, 4, 48, 16, 2).block_m != 1
    assert lora.shrink_config(40, 40, 48, 16, 3).block_m == 1


def test_cpu_reference_path_takes_slices() -> None:
    """add_lora on CPU tensors without the interpreter: the torch reference, slice by slice."""
    gen = torch.Generator().manual_seed(5)
    p = make_sliced(gen, torch.device("cpu"), torch.float32, "distinct", 4, (8, 8, 8), 8)
    y = add_lora_ref(p.y0.clone(), p.x, p.A, p.B, p.indptr, p.slots, p.ranks, p.scales,
                     p.widths)
    assert_close(p, y)


def test_bad_slices_are_named(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(1)
    p = make_sliced(gen, device, torch.float16, "distinct", 3, (16, 16), 8)
    ws = torch.zeros(lora.workspace_numel(3, 8, 2), device=device)
    args = (p.y0.clone(), p.x, p.A, p.B, p.indptr, p.slots)
    with pytest.raises(ValueError, match=r"^sum\(slices\): expected the output width 32"):
        lora.add_lora(*args, p.ranks, p.scales, ws, slices=(16, 8))
    with pytest.raises(ValueError, match=r"^len\(slices\): expected 2..3"):
        lora.add_lora(*args, p.ranks, p.scales, ws, slices=(8, 8, 8, 8))
    with pytest.raises(ValueError, match=r"^ranks.shape: expected \[num_slices, num_slots\]"):
        lora.add_lora(*args, p.ranks[0], p.scales, ws, slices=(16, 16))
    with pytest.raises(ValueError, match=r"^A_pool.shape\[1\]: expected num_slices \(2\)"):
        lora.add_lora(*args[:2], p.A[:, :15].contiguous(), *args[3:], p.ranks, p.scales, ws,
                      slices=(16, 16))
