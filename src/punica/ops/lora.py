"""SGMV multi-LoRA ops: `sgmv_shrink`, `sgmv_expand` (Triton) and `add_lora` (dispatcher).

Meaning (see `lora_ref.py` for the same in plain torch). Segment i owns rows indptr[i]:indptr[i+1]
of the batch and uses adapter slot w = slots[i] (-1: no adapter, rows untouched):

    v.sum(0)[rows, :r] = x[rows] @ A_pool[w, :r].T          # shrink   x [T, in]  -> v [S_k, T, R]
    y[rows] += scales[w] * v.sum(0)[rows, :r] @ B_pool[w, :r] # expand   v         -> y [T, out]

with r = ranks[w], pools [num_slots, max_rank (R), features] indexed by int32 slot, v float32
split-K partials (see `lora_kernels.py`). Loading an adapter into slot w is one copy per pool:
``A_pool[w, :r] = lora_A.weight`` and ``B_pool[w, :r] = lora_B.weight.T``.

`add_lora(..., slices=...)` adds the deltas of up to three projections that share x and write
side by side into y (a fused q/k/v or gate/up GEMM output) in one shrink + expand pair.

No call allocates or syncs with the host (value checks aside: `checks.py`), so every call is
capturable in a CUDA graph. On CPU tensors `add_lora` runs the torch reference; the Triton wrappers
also run on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests the kernels).

Host cost: each wrapper checks its arguments and derives its launch once per argument signature
(`lora_plan.py`) and relaunches the compiled kernel directly (`launch.py`), so an eager call costs
a few microseconds of Python beside the launches themselves (`scripts/host_overhead.py`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from punica.ops import checks as chk
from punica.ops.launch import PlanCache, sig
from punica.ops.lora_config import (
    ExpandConfig,
    ShrinkConfig,
    expand_config,
    shrink_config,
    workspace_numel,
    workspace_views,
)
from punica.ops.lora_plan import (
    AddLoraPlan,
    ExpandPlan,
    ShrinkPlan,
    add_lora_plan,
    expand_plan,
    shrink_plan,
)
from punica.ops.lora_ref import add_lora_ref

__all__ = ["ExpandConfig", "ShrinkConfig", "add_lora", "add_lora_beside", "expand_config",
           "sgmv_expand", "sgmv_shrink", "shrink_config", "workspace_numel", "workspace_views"]

_SHRINK: PlanCache[ShrinkPlan] = PlanCache()
_EXPAND: PlanCache[ExpandPlan] = PlanCache()
_ADD: PlanCache[AddLoraPlan] = PlanCache()


def sgmv_shrink(
    x: torch.Tensor,
    A_pool: torch.Tensor,
    indptr: torch.Tensor,
    slots: torch.Tensor,
    ranks: torch.Tensor,
    v: torch.Tensor,
    config: ShrinkConfig | None = None,
    check_values: bool | None = None,
    v_out: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
) -> torch.Tensor:
    """v.sum(0)[rows, :r] = x[rows] @ A_pool[w, :r].T per segment; v [num_splits, T, max_rank] fp32.

    With config.reduce, also v_out[0] = v.sum(0) on the same entries (v_out [1, T, max_rank] fp32;
    counters: int32, >= T * cdiv(max_rank, 16) elements, all zero, left zero).

    x [T, in] fp16/bf16/fp32 (unit column stride), A_pool [num_slots, max_rank, in] contiguous of
    x's dtype, indptr int32 [S + 1], slots int32 [S], ranks int32 [num_slots]. `config.num_splits`
    must equal v.shape[0] (default: `shrink_config`, and v.shape[0] then must match it). Only the
    entries of rows with an adapter and columns below its rank are written. Returns v.
    """
    key = (sig(x), sig(A_pool), sig(indptr), sig(slots), sig(ranks), sig(v), config,
           sig(v_out), sig(counters))
    plan = _SHRINK.get(key, shrink_plan, x, A_pool, indptr, slots, ranks, v, config, v_out,
                       counters)
    if check_values or (check_values is None and plan.cpu):
        chk.check_values(indptr, slots, ranks, plan.num_tokens, plan.max_rank)
    if plan.launch is not None:
        if plan.reduce:
            plan.launch(x, A_pool, v, indptr, slots, ranks, v_out, counters)
        else:
            plan.launch(x, A_pool, v, indptr, slots, ranks, v, indptr)
    return v


def sgmv_expand(
    v: torch.Tensor,
    B_pool: torch.Tensor,
    indptr: torch.Tensor,
    slots: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    y: torch.Tensor,
    config: ExpandConfig | None = None,
    check_values: bool | None = None,
) -> torch.Tensor:
    """y[rows] += scales[w] * v.sum(0)[rows, :r] @ B_pool[w, :r] per segment, in place.

    v [num_splits, T, max_rank] fp32 contiguous, B_pool [num_slots, max_rank, out] contiguous of
    y's dtype, scales float32 [num_slots], y [T, out] with unit column stride (any row stride, so
    y may be a column slice of a fused output). Rows of base-only segments are untouched. Returns y.
    """
    key = (sig(v), sig(B_pool), sig(indptr), sig(slots), sig(ranks), sig(scales), sig(y), config)
    plan = _EXPAND.get(key, expand_plan, v, B_pool, indptr, slots, ranks, scales, y, config)
    if check_values or (check_values is None and plan.cpu):
        chk.check_values(indptr, slots, ranks, plan.num_tokens, plan.max_rank)
    if plan.launch is not None:
        plan.launch(v, B_pool, y, indptr, slots, ranks, scales)
    return y


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    A_pool: torch.Tensor,
    B_pool: torch.Tensor,
    indptr: torch.Tensor,
    slots: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    workspace: torch.Tensor | None = None,
    check_values: bool | None = None,
    shrink: ShrinkConfig | None = None,
    expand: ExpandConfig | None = None,
    slices: tuple[int, ...] = (),
) -> torch.Tensor:
    """y[rows] += scales[w] * (x[rows] @ A_pool[w, :r].T) @ B_pool[w, :r] per segment, in place.

    CUDA: shrink + expand kernels; `workspace` is a zeroed float32 buffer of at least
    `workspace_numel(T, max_rank, len(slices) or 1)` elements, allocated once by the caller
    (required on CUDA); `shrink` / `expand` override the default launches (e.g. reduce=True).
    CPU: the torch reference (`workspace` unused). Returns y.

    LoRA slices: projections that read x and write side by side into y (a fused q/k/v or
    gate/up output) in one call. slices = (out_0, ..., out_{S-1}) (2 <= S <= 3, summing to y's
    width); slice s (columns c_s = sum(out_:s) .. + out_s, rank r = ranks[s, w], R the per-slice
    max rank) is
        y[rows, c_s] += scales[s, w] * (x[rows] @ A_pool[w, s*R : s*R + r].T) @ B_pool[w, :r, c_s]
    with A_pool [num_slots, S*R, in], B_pool [num_slots, R, sum(out)], ranks int32 and scales
    float32 [S, num_slots] (contiguous rows, the same row stride).
    """
    if x.is_cpu and not chk.interpreting():
        return add_lora_ref(y, x, A_pool, B_pool, indptr, slots, ranks, scales, slices)
    plan = _add_plan(y, x, A_pool, B_pool, indptr, slots, ranks, scales, workspace,
                     check_values, shrink, expand, slices, False)
    if plan is not None:
        assert workspace is not None  # the plan checked it
        v, v_out, counters = plan.views(workspace)
        _shrink(plan, x, A_pool, indptr, slots, ranks, v, v_out, counters)
        _expand(plan, B_pool, y, indptr, slots, ranks, scales, v, v_out)
    return y


def add_lora_beside(
    base: Callable[[], torch.Tensor],
    x: torch.Tensor,
    A_pool: torch.Tensor,
    B_pool: torch.Tensor,
    indptr: torch.Tensor,
    slots: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    workspace: torch.Tensor,
    stream: torch.cuda.Stream | None,
    check_values: bool | None = None,
    slices: tuple[int, ...] = (),
) -> torch.Tensor:
    """y = base() plus `add_lora`'s deltas, the shrink running beside base() on `stream`.

    base() computes y [T, out] from x on the current stream (the projection's GEMM,
    x @ W.T [+ bias]); the shrink reads only x, so it need not wait for that GEMM:

        current:  fork ── base(): y = x @ W.T ────────── join ── expand: y += v @ B
        stream:     └──── shrink: v = x @ A.T ────────────┘

    The fork is a wait of `stream` on the current stream once x is written (and every earlier
    expand has read the workspace v); the join a wait of the current stream on `stream`. Both
    are captured as graph edges. The shrink's latency then hides behind the GEMM instead of
    following it; the expand follows the GEMM with PDL and reads y after its wait.
    stream None: the same launches one after the other (CPU interpreter tests). On CPU without
    the interpreter: the torch reference. Returns y.
    """
    if x.is_cpu and not chk.interpreting():
        return add_lora_ref(base(), x, A_pool, B_pool, indptr, slots, ranks, scales, slices)
    if stream is not None:
        current = torch.cuda.current_stream(x.device)
        stream.wait_stream(current)
    y = base()
    plan = _add_plan(y, x, A_pool, B_pool, indptr, slots, ranks, scales, workspace,
                     check_values, None, None, slices, True)
    if plan is not None:
        v, v_out, counters = plan.views(workspace)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            _shrink(plan, x, A_pool, indptr, slots, ranks, v, v_out, counters)
    if stream is not None:  # joined even with nothing launched: a capture needs it back
        current.wait_stream(stream)
    if plan is not None:
        _expand(plan, B_pool, y, indptr, slots, ranks, scales, v, v_out)
    return y


def _add_plan(y: torch.Tensor, x: torch.Tensor, A_pool: torch.Tensor, B_pool: torch.Tensor,
              indptr: torch.Tensor, slots: torch.Tensor, ranks: torch.Tensor,
              scales: torch.Tensor, workspace: torch.Tensor | None, check_values: bool | None,
              shrink: ShrinkConfig | None, expand: ExpandConfig | None,
              slices: tuple[int, ...], beside: bool) -> AddLoraPlan | None:
    """The checked plan of an add_lora call (value checks when asked); None: nothing to launch."""
    key = (sig(y), sig(x), sig(A_pool), sig(B_pool), sig(indptr), sig(slots), sig(ranks),
           sig(scales), sig(workspace), shrink, expand, slices, beside)
    plan = _ADD.get(key, add_lora_plan, y, x, A_pool, B_pool, indptr, slots, ranks, scales,
                    workspace, shrink, expand, slices, beside)
    s, e = plan.shrink, plan.expand
    if check_values or (check_values is None and plan.cpu):
        chk.check_values(indptr, slots, ranks, s.num_tokens, s.max_rank)
    return None if s.launch is None or e.launch is None else plan


def _shrink(plan: AddLoraPlan, x: torch.Tensor, A_pool: torch.Tensor, indptr: torch.Tensor,
            slots: torch.Tensor, ranks: torch.Tensor, v: torch.Tensor, v_out: torch.Tensor,
            counters: torch.Tensor) -> None:
    launch = plan.shrink.launch
    assert launch is not None  # _add_plan returns None otherwise
    if plan.shrink.reduce:
        launch(x, A_pool, v, indptr, slots, ranks, v_out, counters)
    else:
        launch(x, A_pool, v, indptr, slots, ranks, v, indptr)


def _expand(plan: AddLoraPlan, B_pool: torch.Tensor, y: torch.Tensor, indptr: torch.Tensor,
            slots: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor, v: torch.Tensor,
            v_out: torch.Tensor) -> None:
    launch = plan.expand.launch
    assert launch is not None
    launch(v_out if plan.shrink.reduce else v, B_pool, y, indptr, slots, ranks, scales)
