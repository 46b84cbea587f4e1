"""SGMV kernels at real model sizes on the GPU, and under CUDA-graph capture and replay."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from punica.bench.workloads import MIXES, indptr_of, segment_lengths
from punica.ops import lora
from tests.ops.lora_cases import (
    REL_TOL,
    make_problem,
    mixed_ranks,
    problem_for_mix,
    rel_err,
    seed_of,
)
from tests.ops.test_lora import assert_matches, run_kernels, run_reference

pytestmark = pytest.mark.gpu

# (in, out) of real projections: Llama-2-7B/13B/70B, Llama-3-8B, Mistral-7B, Qwen2; GQA k/v sizes.
SHAPES = [
    (4096, 4096), (4096, 1024), (4096, 11008), (11008, 4096), (5120, 5120), (5120, 13824),
    (13824, 5120), (4096, 14336), (14336, 4096), (8192, 1024), (8192, 28672), (28672, 8192),
    (2048, 2048), (2048, 256), (1024, 1024), (3584, 512),
]


@pytest.mark.parametrize("bs", (1, 7, 64, 133))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_model_sizes(dtype: torch.dtype, shape: tuple[int, int], bs: int) -> None:
    gen = torch.Generator().manual_seed(seed_of(dtype, shape, bs))
    mix = MIXES[seed_of(shape, bs) % len(MIXES)]
    p = problem_for_mix(gen, torch.device("cuda"), dtype, mix, bs, shape[0], shape[1],
                        max_rank=128)
    assert_matches(p, *run_kernels(p))


@pytest.mark.parametrize("lengths", ([1, 511], [300, 700, 24], [2048], [5, 1000, 3, 16, 1]))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16, torch.float32), ids=str)
def test_prefill_segments(dtype: torch.dtype, lengths: list[int]) -> None:
    gen = torch.Generator().manual_seed(sum(lengths))
    p = make_problem(gen, torch.device("cuda"), dtype, lengths, 4096, 11008, max_rank=64,
                     slot_ranks=mixed_ranks(gen, len(lengths) + 1, 64))
    assert_matches(p, *run_kernels(p))


@pytest.mark.parametrize("mix", MIXES)
def test_cuda_graph_replay_follows_new_segments(mix: str) -> None:
    """Capture add_lora once for T rows and S segment slots; replay with new tables and inputs."""
    device, dtype, T, S, R = torch.device("cuda"), torch.float16, 64, 64, 64
    gen = torch.Generator().manual_seed(3)
    p = problem_for_mix(gen, device, dtype, "distinct", T, 4096, 11008, max_rank=R)
    workspace = torch.zeros(lora.workspace_numel(T, R), device=device)
    y = p.y0.clone()
    args = (p.x, p.A, p.B, p.indptr, p.slots, p.ranks, p.scales, workspace)
    lora.add_lora(y, *args)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lora.add_lora(y, *args)
    lengths = segment_lengths(mix, T)
    order = torch.randperm(p.ranks.numel(), generator=gen).tolist()
    slots = [order[i % len(order)] if i % 4 != 2 else -1 for i in range(len(lengths))]
    padded_indptr = indptr_of(lengths) + [T] * (S - len(lengths))  # empty trailing segments
    p.indptr.copy_(torch.tensor(padded_indptr, dtype=torch.int32))
    p.slots.copy_(torch.tensor(slots + [-1] * (S - len(slots)), dtype=torch.int32))
    p.x.copy_(torch.randn(p.x.shape, generator=gen).to(dtype))
    y.copy_(p.y0)
    graph.replay()
    torch.cuda.synchronize()
    _, y_ref = run_reference(p)
    assert rel_err(y.cpu(), y_ref) <= REL_TOL[dtype]
    assert not torch.equal(y.cpu(), p.y0.cpu())


@pytest.mark.parametrize("mix,bs", [("distinct", 64), ("identical", 64), ("distinct", 1),
                                    ("skewed", 133)])
def test_reduce_in_shrink_under_replay_stress(mix: str, bs: int) -> None:
    """The arrival-counter reduction is a cross-program protocol: replay it many times in a
    graph on fresh inputs and compare each result (a race shows as a moving error)."""
    device, dtype, R = torch.device("cuda"), torch.float16, 16
    gen = torch.Generator().manual_seed(seed_of("stress", mix, bs))
    p = problem_for_mix(gen, device, dtype, mix, bs, 4096, 11008, max_rank=R)
    workspace = torch.zeros(lora.workspace_numel(bs, R), device=device)
    shrink = dataclasses.replace(lora.shrink_config(bs, p.slots.numel(), 4096, R), reduce=True)
    y = p.y0.clone()
    args = (p.x, p.A, p.B, p.indptr, p.slots, p.ranks, p.scales, workspace)
    lora.add_lora(y, *args, shrink=shrink)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lora.add_lora(y, *args, shrink=shrink)
    for trial in range(40):
        p.x.copy_(torch.randn(p.x.shape, generator=gen).to(dtype))
        y.copy_(p.y0)
        for _ in range(5):  # back-to-back replays reuse the counters the previous one reset
            graph.replay()
            y.copy_(p.y0)
        graph.replay()
        torch.cuda.synchronize()
        _, y_ref = run_reference(p)
        assert rel_err(y.cpu(), y_ref) <= REL_TOL[dtype], f"trial {trial}"
    _, _, counters = lora.workspace_views(workspace, shrink.num_splits, bs, R)
    assert int(counters.abs().sum()) == 0
