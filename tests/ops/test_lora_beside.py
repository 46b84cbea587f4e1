"""add_lora_beside: a projection's GEMM and its LoRA shrink side by side, then the expand.

y = x @ W.T (the GEMM, `base`) plus the deltas of add_lora, compared with the same GEMM plus the
torch reference. On a GPU the shrink runs on a second stream, eagerly and captured in a CUDA
graph (replayed on fresh inputs, at sizes where the GEMM outlasts the shrink, so an expand that
read y before the GEMM finished would show); on the CPU the interpreter runs the same launches
one after the other. Row kernels (decode-shaped batches) and tile kernels (long segments), one
projection and LoRA slices.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from punica.bench.workloads import MIXES
from punica.ops import checks, lora
from punica.ops.lora_ref import add_lora_ref
from tests.ops.lora_cases import REL_TOL, Problem, make_problem, problem_for_mix, rel_err, seed_of
from tests.ops.test_lora_slices import Sliced, make_sliced


def side_stream(device: torch.device) -> torch.cuda.Stream | None:
    return torch.cuda.Stream(device) if device.type == "cuda" else None


def weight(gen: torch.Generator, p: Problem | Sliced) -> torch.Tensor:
    out_f, in_f = p.y0.shape[1], p.x.shape[1]
    return (torch.randn(out_f, in_f, generator=gen) * in_f**-0.5).to(p.x.dtype).to(p.x.device)


def slices_of(p: Problem | Sliced) -> tuple[int, ...]:
    return p.widths if isinstance(p, Sliced) else ()


def expected(p: Problem | Sliced, W: torch.Tensor) -> torch.Tensor:
    """The GEMM, then each delta by the torch reference (fp32 inside, on the CPU)."""
    y = F.linear(p.x, W).cpu().float()
    if isinstance(p, Sliced):
        return dataclasses.replace(p, y0=y).reference()  # each slice's delta added to y0
    return add_lora_ref(y, p.x.cpu().float(), p.A.cpu().float(), p.B.cpu().float(),
                        p.indptr.cpu(), p.slots.cpu(), p.ranks.cpu(), p.scales.cpu())


def run_beside(p: Problem | Sliced, W: torch.Tensor, workspace: torch.Tensor,
               stream: torch.cuda.Stream | None) -> torch.Tensor:
    return lora.add_lora_beside(lambda: F.linear(p.x, W), p.x, p.A, p.B, p.indptr, p.slots,
                                p.ranks, p.scales, workspace, stream, slices=slices_of(p))


def make_workspace(p: Problem | Sliced) -> torch.Tensor:
    slices = max(len(slices_of(p)), 1)
    return torch.zeros(lora.workspace_numel(p.x.shape[0], p.B.shape[1], slices),
                       device=p.x.device)


def assert_close(p: Problem | Sliced, W: torch.Tensor, y: torch.Tensor) -> None:
    want = expected(p, W)
    tol = REL_TOL[p.x.dtype]
    assert rel_err(y, want) <= tol
    base = F.linear(p.x, W).cpu().float()
    assert rel_err(base, want) > 3 * tol  # the deltas are there to be dropped


@pytest.mark.parametrize("bs", (1, 7, 33, 160))  # row kernels up to 33, tile kernels at 160
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
def test_one_projection(device: torch.device, dtype: torch.dtype, mix: str, bs: int) -> None:
    gen = torch.Generator().manual_seed(seed_of("beside", dtype, mix, bs))
    p = problem_for_mix(gen, device, dtype, mix, bs, in_features=64, out_features=48,
                        max_rank=16 if bs < 160 else 32)
    W = weight(gen, p)
    assert_close(p, W, run_beside(p, W, make_workspace(p), side_stream(device)))


@pytest.mark.parametrize("bs", (6, 40))
@pytest.mark.parametrize("mix", ("distinct", "skewed"))
def test_slices(device: torch.device, mix: str, bs: int) -> None:
    gen = torch.Generator().manual_seed(seed_of("beside-slices", mix, bs))
    p = make_sliced(gen, device, torch.float16, mix, bs, (40, 24, 24), max_rank=16)
    W = weight(gen, p)
    assert_close(p, W, run_beside(p, W, make_workspace(p), side_stream(device)))


def test_plan_is_its_own() -> None:
    """The shrink beside a GEMM has no PDL wait (nothing before it on its stream), and its
    expand must not read y before its wait: another plan than add_lora's."""
    gen = torch.Generator().manual_seed(1)
    p = make_problem(gen, torch.device("cpu"), torch.float32, [1, 1], 16, 8, 16, [16, 8])
    W = weight(gen, p)
    ws = make_workspace(p)
    before = len(lora._ADD.plans)
    run_beside(p, W, ws, None)
    lora.add_lora(F.linear(p.x, W), p.x, p.A, p.B, p.indptr, p.slots, p.ranks, p.scales, ws)
    if checks.interpreting():
        assert len(lora._ADD.plans) == before + 2
    else:  # plain CPU: the torch reference, no plans at all
        assert len(lora._ADD.plans) == before


@pytest.mark.gpu
@pytest.mark.parametrize("mix", ("distinct", "identical"))
@pytest.mark.parametrize("bs,out_features", ((64, 11008), (8, 4096), (133, 22016)))
def test_graph_replays_on_fresh_inputs(mix: str, bs: int, out_features: int) -> None:
    """Captured once with the side stream, replayed on new x and segments: every replay matches
    (a race between the expand and the GEMM would show as a moving error)."""
    device, dtype = torch.device("cuda"), torch.float16
    gen = torch.Generator().manual_seed(seed_of("beside-graph", mix, bs, out_features))
    p = problem_for_mix(gen, device, dtype, mix, bs, 4096, out_features, max_rank=16)
    W = weight(gen, p)
    ws, stream = make_workspace(p), side_stream(device)
    run_beside(p, W, ws, stream)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = run_beside(p, W, ws, stream)
    for _ in range(5):
        fresh = problem_for_mix(gen, device, dtype, mix, bs, 4096, out_features, max_rank=16)
        for name in ("x", "A", "B", "indptr", "slots", "ranks", "scales"):
            getattr(p, name).copy_(getattr(fresh, name))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(p, W, y)


def test_no_rows_is_the_gemm_alone(device: torch.device) -> None:
    """Nothing to add (no rows): y is base()'s output, and the side stream is joined back."""
    gen = torch.Generator().manual_seed(2)
    p = make_problem(gen, device, torch.float16, [3], 32, 24, 16, [16])
    x = p.x[:0]
    W = weight(gen, p)
    indptr = torch.zeros(2, dtype=torch.int32, device=device)
    ws, stream = make_workspace(p), side_stream(device)

    def call() -> torch.Tensor:
        return lora.add_lora_beside(lambda: F.linear(x, W), x, p.A, p.B, indptr, p.slots,
                                    p.ranks, p.scales, ws, stream)

    assert call().shape == (0, 24)
    if device.type == "cuda":  # a capture ends only with every forked stream joined back
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            assert call().shape == (0, 24)
        graph.replay()
