"""SGMV kernels vs the torch reference: dtypes x ranks x adapter mixes x batch sizes.

On CPU the kernels run under Triton's interpreter (small feature sizes); on a GPU natively.
Outputs are poisoned (NaN) before each kernel call, so an unwritten element fails the comparison.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from punica.bench.workloads import MIXES
from punica.ops import lora, lora_config, lora_ref
from tests.ops.lora_cases import (
    REL_TOL,
    Problem,
    make_problem,
    mixed_ranks,
    problem_for_mix,
    rel_err,
    seed_of,
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BATCH_SIZES = (1, 2, 3, 7, 16, 33, 64, 133)


def run_kernels(p: Problem, shrink: lora.ShrinkConfig | None = None,
                expand: lora.ExpandConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(v [splits, T, R] poisoned then shrunk, y = y0 + expand) through the Triton ops."""
    T, in_features = p.x.shape
    shrink = shrink or lora.shrink_config(T, p.slots.numel(), in_features, p.max_rank)
    v = torch.full((shrink.num_splits, T, p.max_rank), float("nan"), device=p.x.device)
    lora.sgmv_shrink(p.x, p.A, p.indptr, p.slots, p.ranks, v, shrink)
    y = p.y0.clone()
    # Right after its shrink, so the expand may read y and B before its wait (PDL, on Hopper).
    expand = expand or dataclasses.replace(
        lora.expand_config(T, p.slots.numel(), p.y0.shape[1], p.max_rank), use_pdl=None)
    lora.sgmv_expand(v, p.B, p.indptr, p.slots, p.ranks, p.scales, y, expand)
    return v, y


def run_reference(p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch reference (fp32 inside) on the problem's device; results on the CPU."""
    v = torch.zeros(1, p.x.shape[0], p.max_rank, device=p.x.device)
    lora_ref.sgmv_shrink_ref(p.x, p.A, p.indptr, p.slots, p.ranks, v)
    y = p.y0.clone()
    lora_ref.sgmv_expand_ref(v, p.B, p.indptr, p.slots, p.ranks, p.scales, y)
    return v.cpu(), y.cpu()


def assert_matches(p: Problem, v: torch.Tensor, y: torch.Tensor) -> None:
    v_ref, y_ref = run_reference(p)
    dtype = p.x.dtype
    mask = p.v_mask()
    v_sum = v.sum(0).cpu()
    assert not torch.isnan(v_sum[mask]).any(), "shrink left defined entries unwritten"
    assert rel_err(v_sum[mask], v_ref.sum(0)[mask]) <= REL_TOL[torch.float32] * 4
    touched = p.touched_rows()
    y_cpu, y0 = y.cpu(), p.y0.cpu()
    assert torch.equal(y_cpu[~touched], y0[~touched]), "base-only rows were modified"
    if touched.any():
        assert rel_err(y_cpu[touched], y_ref[touched]) <= REL_TOL[dtype]
        # The deltas are large enough that dropping them would fail the check above.
        assert rel_err(y0[touched], y_ref[touched]) > 3 * REL_TOL[dtype]


@pytest.mark.parametrize("bs", BATCH_SIZES)
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference_across_mixes(device: torch.device, dtype: torch.dtype, mix: str,
                                        bs: int) -> None:
    gen = torch.Generator().manual_seed(seed_of(dtype, mix, bs))
    p = problem_for_mix(gen, device, dtype, mix, bs, in_features=96, out_features=80,
                        max_rank=64)
    assert_matches(p, *run_kernels(p))


@pytest.mark.parametrize("rank", (1, 8, 16, 32, 64, 128))
def test_each_rank(device: torch.device, rank: int) -> None:
    gen = torch.Generator().manual_seed(rank)
    p = make_problem(gen, device, torch.float32, [3, 1, 5], 64, 48, max_rank=128,
                     slot_ranks=[rank, rank, rank])
    assert_matches(p, *run_kernels(p))


@pytest.mark.parametrize("num_splits", (1, 2, 3, 4))
@pytest.mark.parametrize("block_m,tiles_per_program", ((16, 1), (16, 3), (32, 2)))
def test_launch_configs_agree(device: torch.device, num_splits: int, block_m: int,
                              tiles_per_program: int) -> None:
    gen = torch.Generator().manual_seed(num_splits * 100 + block_m + tiles_per_program)
    p = make_problem(gen, device, torch.float16, [1, 40, 2, 17], 200, 136, max_rank=32,
                     slot_ranks=mixed_ranks(gen, 5, 32), base_only_every=0)
    shrink = lora.ShrinkConfig(block_m=block_m, block_r=16, block_k=32, num_splits=num_splits)
    expand = lora.ExpandConfig(block_m=block_m, block_n=32, block_r=32,
                               tiles_per_program=tiles_per_program)
    assert_matches(p, *run_kernels(p, shrink, expand))


def row_configs(num_splits: int, block_r: int, tiles_per_program: int = 1,
                reduce: bool = False, prefetch: bool = True,
                ) -> tuple[lora.ShrinkConfig, lora.ExpandConfig]:
    return (lora.ShrinkConfig(block_m=1, block_r=block_r, block_k=32, num_splits=num_splits,
                              reduce=reduce),
            lora.ExpandConfig(block_m=1, block_n=32, block_r=block_r,
                              tiles_per_program=tiles_per_program, prefetch=prefetch))


@pytest.mark.parametrize("bs", (1, 3, 16, 33))
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_kernels_match_reference(device: torch.device, dtype: torch.dtype, mix: str,
                                     bs: int) -> None:
    """The one-row-per-program kernels (block_m = 1) over the same mixes, ranks mixed."""
    gen = torch.Generator().manual_seed(seed_of("rows", dtype, mix, bs))
    p = problem_for_mix(gen, device, dtype, mix, bs, in_features=96, out_features=80,
                        max_rank=64)
    assert_matches(p, *run_kernels(p, *row_configs(3, 64, tiles_per_program=2)))


@pytest.mark.parametrize("tiles_per_program", (1, 3))
@pytest.mark.parametrize("mix", MIXES)
def test_row_expand_without_prefetch(device: torch.device, mix: str,
                                     tiles_per_program: int) -> None:
    """The row expand that loads each B slab when it is summed (PREFETCH off)."""
    gen = torch.Generator().manual_seed(seed_of("noprefetch", mix, tiles_per_program))
    p = problem_for_mix(gen, device, torch.float16, mix, 17, in_features=64, out_features=112,
                        max_rank=32)
    assert_matches(p, *run_kernels(p, *row_configs(2, 32, tiles_per_program, prefetch=False)))


@pytest.mark.parametrize("rank", (1, 8, 16, 32, 64, 128))
def test_row_kernels_each_rank(device: torch.device, rank: int) -> None:
    """Rank tiles narrower than the pool (block_r 16 over max_rank 128) and the whole rank."""
    gen = torch.Generator().manual_seed(rank + 1000)
    p = make_problem(gen, device, torch.float16, [1, 1, 2, 1], 64, 48, max_rank=128,
                     slot_ranks=[rank, rank, rank])
    shrink, expand = row_configs(2, 128)
    assert_matches(p, *run_kernels(p, dataclasses.replace(shrink, block_r=16), expand))


@pytest.mark.parametrize("bs", (3, 33))
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("family", ("row", "tile"))
def test_both_families_at_rank_64(device: torch.device, family: str, mix: str, bs: int) -> None:
    """Rank 64 decode batches through the configs each kernel family would get by default:
    the tile pair is the default there (lora_config.ROW_KERNEL_MAX_RANK), the row pair stays
    reachable by explicit config."""
    gen = torch.Generator().manual_seed(seed_of("family", family, mix, bs))
    p = problem_for_mix(gen, device, torch.float16, mix, bs, in_features=512, out_features=272,
                        max_rank=64)
    S = p.slots.numel()
    if family == "row":
        shrink = lora_config.row_shrink_config(bs, S, 512, 64)
        expand = lora_config.row_expand_config(bs, S, 64)
        assert (shrink.block_m, expand.block_m) == (1, 1)
    else:
        shrink = lora_config.tile_shrink_config(bs, S, 512, 64)
        expand = lora_config.tile_expand_config(bs, S, 272, 64)
        assert (shrink, expand) == (lora.shrink_config(bs, S, 512, 64),
                                    lora.expand_config(bs, S, 272, 64))
    assert_matches(p, *run_kernels(p, shrink, dataclasses.replace(expand, use_pdl=None)))


def test_uncovered_rows_and_empty_segments(device: torch.device) -> None:
    """Empty segments anywhere, and rows past indptr[-1], are left alone."""
    gen = torch.Generator().manual_seed(7)
    p = make_problem(gen, device, torch.float32, [0, 4, 0, 3, 0], 64, 32, max_rank=16,
                     slot_ranks=[16, 8, 4, 2])
    p.x = torch.cat([p.x, torch.randn(2, 64, generator=gen).to(device)])
    p.y0 = torch.cat([p.y0, torch.randn(2, 32, generator=gen).to(device)])
    v, y = run_kernels(p)
    assert torch.equal(y[-2:], p.y0[-2:])
    assert_matches(p, v, y)


def test_output_column_slice(device: torch.device) -> None:
    """y may be a column slice of a fused output (row stride > width): other columns untouched."""
    gen = torch.Generator().manual_seed(11)
    p = make_problem(gen, device, torch.float16, [2, 3, 1], 64, 40, max_rank=16,
                     slot_ranks=[16, 8, 12])
    fused = torch.randn(p.x.shape[0], 100, generator=gen).half().to(device)
    before = fused.clone()
    fused[:, 30:70] = p.y0
    v = torch.zeros(lora.shrink_config(6, 3, 64, 16).num_splits, 6, 16, device=device)
    lora.sgmv_shrink(p.x, p.A, p.indptr, p.slots, p.ranks, v)
    lora.sgmv_expand(v, p.B, p.indptr, p.slots, p.ranks, p.scales, fused[:, 30:70])
    assert torch.equal(fused[:, :30], before[:, :30])
    assert torch.equal(fused[:, 70:], before[:, 70:])
    assert_matches(p, v, fused[:, 30:70])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_lora_matches_reference(device: torch.device, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    p = problem_for_mix(gen, device, dtype, "skewed", 20, 64, 72, max_rank=32)
    workspace = torch.zeros(lora.workspace_numel(20, 32), device=device)
    y = p.y0.clone()
    lora.add_lora(y, p.x, p.A, p.B, p.indptr, p.slots, p.ranks, p.scales, workspace)
    _, y_ref = run_reference(p)
    assert rel_err(y.cpu(), y_ref) <= REL_TOL[dtype]


@pytest.mark.parametrize("block_m", (1, 16))
@pytest.mark.parametrize("num_splits", (1, 3, 4))
@pytest.mark.parametrize("mix", MIXES)
def test_reduce_in_shrink(device: torch.device, mix: str, num_splits: int,
                          block_m: int) -> None:
    """The last split to finish sums the partials into v_out; every counter is zero again."""
    gen = torch.Generator().manual_seed(seed_of("reduce", mix, num_splits, block_m))
    p = problem_for_mix(gen, device, torch.float16, mix, 21, 96, 80, max_rank=32)
    T = p.x.shape[0]
    workspace = torch.zeros(lora.workspace_numel(T + 5, 32), device=device)
    shrink = lora.ShrinkConfig(block_m=block_m, block_r=16, block_k=32, num_splits=num_splits,
                               reduce=True)
    for _ in range(2):  # the second call relies on the counters the first one reset
        v, v_out, counters = lora.workspace_views(workspace, num_splits, T, 32)
        v_out.fill_(float("nan"))
        y = p.y0.clone()
        lora.add_lora(y, p.x, p.A, p.B, p.indptr, p.slots, p.ranks, p.scales, workspace,
                      shrink=shrink)
        v_ref, y_ref = run_reference(p)
        mask = p.v_mask()
        assert rel_err(v_out[0].cpu()[mask], v_ref.sum(0)[mask]) <= REL_TOL[torch.float32] * 4
        assert rel_err(y.cpu(), y_ref) <= REL_TOL[torch.float16]
        assert int(counters.abs().sum()) == 0


def test_reduce_needs_its_buffers(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(1)
    p = problem_for_mix(gen, device, torch.float32, "uniform", 4, 32, 24, max_rank=16)
    cfg = lora.ShrinkConfig(block_m=16, block_r=16, block_k=32, num_splits=2, reduce=True)
    v = torch.zeros(2, 4, 16, device=device)
    with pytest.raises(ValueError, match=r"^v_out: expected a contiguous float32"):
        lora.sgmv_shrink(p.x, p.A, p.indptr, p.slots, p.ranks, v, cfg)
    with pytest.raises(ValueError, match=r"^counters: expected a zeroed int32"):
        lora.sgmv_shrink(p.x, p.A, p.indptr, p.slots, p.ranks, v, cfg,
                         v_out=torch.zeros(1, 4, 16, device=device))
