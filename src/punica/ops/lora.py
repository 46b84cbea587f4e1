"""SGMV multi-LoRA ops: `sgmv_shrink`, `sgmv_expand` (Triton) and `add_lora` (dispatcher).

Meaning (see `lora_ref.py` for the same in plain torch). Segment i owns rows indptr[i]:indptr[i+1]
of the batch and uses adapter slot w = slots[i] (-1: no adapter, rows untouched):

    v.sum(0)[rows, :r] = x[rows] @ A_pool[w, :r].T          # shrink   x [T, in]  -> v [S_k, T, R]
    y[rows] += scales[w] * v.sum(0)[rows, :r] @ B_pool[w, :r] # expand   v         -> y [T, out]

with r = ranks[w], pools [num_slots, max_rank (R), features] indexed by int32 slot, v float32
split-K partials (see `lora_kernels.py`). Loading an adapter into slot w is one copy per pool:
``A_pool[w, :r] = lora_A.weight`` and ``B_pool[w, :r] = lora_B.weight.T``.

No call allocates or syncs with the host (value checks aside: `checks.py`), so every call is
capturable in a CUDA graph. On CPU tensors `add_lora` runs the torch reference; the Triton wrappers
also run on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests the kernels).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
import triton

from punica.ops import checks as chk
from punica.ops.lora_config import (
    ExpandConfig,
    ShrinkConfig,
    expand_config,
    shrink_config,
    workspace_numel,
    workspace_views,
)
from punica.ops.lora_kernels import sgmv_expand_kernel, sgmv_shrink_kernel
from punica.ops.lora_ref import add_lora_ref
from punica.ops.lora_row_kernels import sgmv_expand_rows_kernel, sgmv_shrink_rows_kernel
from punica.ops.tiles import block_s, grid_rows

__all__ = ["ExpandConfig", "ShrinkConfig", "add_lora", "expand_config", "sgmv_expand",
           "sgmv_shrink", "shrink_config", "workspace_numel", "workspace_views"]


def _precision(dtype: torch.dtype) -> str:
    # fp32 models: exact fp32 dots. fp16/bf16: the shrink's dot is 16-bit x 16-bit -> fp32; the
    # expand multiplies fp32 v in tf32 (10-bit mantissa, 8-bit exponent): at least the precision of
    # the fp16/bf16 output it is added to, and v never overflows as a 16-bit v could.
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def _pdl_supported(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _use_pdl(flag: bool | None, device: torch.device) -> bool:
    if chk.interpreting() or device.type != "cuda" or flag is False:
        return False
    supported = _pdl_supported(device.index if device.index is not None else 0)
    if flag and not supported:
        raise ValueError("use_pdl: expected a device of compute capability >= 9.0 (Hopper), "
                         f"got {torch.cuda.get_device_name(device)}")
    return supported and os.environ.get("PUNICA_DISABLE_PDL", "0") != "1"


def _launch_opts(config: ShrinkConfig | ExpandConfig, pdl: bool) -> dict[str, object]:
    opts: dict[str, object] = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    if pdl:
        opts["launch_pdl"] = True
    return opts


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
    chk.check_activation("x", x)
    num_tokens, in_features = x.shape
    chk.check_pool("A_pool", A_pool, x.dtype, x.device, in_features)
    num_slots, max_rank, _ = A_pool.shape
    chk.check_segments(indptr, slots, ranks, x.device, num_slots)
    chk.check_workspace(v, num_tokens, max_rank, x.device)
    num_segments = slots.numel()
    if config is None:
        config = shrink_config(num_tokens, num_segments, in_features, max_rank)
    chk.expect(v.shape[0] == config.num_splits, "v.shape[0]",
               f"num_splits = {config.num_splits}", v.shape[0])
    if config.reduce:
        chk.expect(v_out is not None and tuple(v_out.shape) == (1, num_tokens, max_rank)
                   and v_out.dtype == torch.float32 and v_out.is_contiguous(), "v_out",
                   f"a contiguous float32 [1, {num_tokens}, {max_rank}] tensor (config.reduce)",
                   None if v_out is None else (tuple(v_out.shape), v_out.dtype))
        need = num_tokens * triton.cdiv(max_rank, 16)
        chk.expect(counters is not None and counters.dtype == torch.int32
                   and counters.numel() >= need, "counters",
                   f"a zeroed int32 tensor of >= {need} elements (config.reduce)",
                   None if counters is None else (counters.numel(), counters.dtype))
    if chk.should_check_values(x, check_values):
        chk.check_values(indptr, slots, ranks, num_tokens, max_rank)
    if num_tokens == 0 or num_segments == 0:
        return v
    pdl = _use_pdl(config.use_pdl, x.device)
    k_per_split = triton.cdiv(triton.cdiv(in_features, config.num_splits), config.block_k)
    grid = (grid_rows(num_tokens, num_segments, config.block_m),
            triton.cdiv(max_rank, config.block_r), config.num_splits)
    v_out = v_out if config.reduce else v
    counters = counters if config.reduce else indptr
    common = (x, A_pool, v, indptr, slots, ranks, v_out, counters,
              num_segments, num_slots, max_rank, in_features, k_per_split * config.block_k,
              grid[1], x.stride(0), A_pool.stride(0), A_pool.stride(1), v.stride(0), v.stride(1),
              v_out.stride(1))
    flags = dict(BLOCK_R=config.block_r, BLOCK_K=config.block_k, BLOCK_S=block_s(num_segments),
                 USE_PDL=pdl, REDUCE=config.reduce, NUM_SPLITS=config.num_splits,
                 FENCE=not chk.interpreting(), **_launch_opts(config, pdl))
    if config.block_m == 1:
        sgmv_shrink_rows_kernel[grid](*common, **flags)
        return v
    sgmv_shrink_kernel[grid](
        *common, BLOCK_M=config.block_m, PRECISION=_precision(x.dtype),
        # Triton's CPU interpreter multiplies bf16 tiles as raw uint16 bits in tl.dot: upcast there.
        DOT_IN_FP32=chk.interpreting() and x.dtype == torch.bfloat16, **flags,
    )
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
    chk.check_activation("y", y)
    num_tokens, out_features = y.shape
    chk.check_pool("B_pool", B_pool, y.dtype, y.device, out_features)
    num_slots, max_rank, _ = B_pool.shape
    chk.check_segments(indptr, slots, ranks, y.device, num_slots)
    chk.check_vector("scales", scales, torch.float32, y.device, num_slots)
    chk.check_workspace(v, num_tokens, max_rank, y.device)
    num_segments = slots.numel()
    if config is None:
        config = expand_config(num_tokens, num_segments, out_features, max_rank)
    chk.expect(config.block_r >= max_rank, "config.block_r", f">= max_rank ({max_rank})",
               config.block_r)
    if chk.should_check_values(y, check_values):
        chk.check_values(indptr, slots, ranks, num_tokens, max_rank)
    if num_tokens == 0 or num_segments == 0:
        return y
    pdl = _use_pdl(config.use_pdl, y.device)
    span = config.block_n * config.tiles_per_program
    grid = (grid_rows(num_tokens, num_segments, config.block_m), triton.cdiv(out_features, span))
    common = (v, B_pool, y, indptr, slots, ranks, scales,
              num_segments, num_slots, max_rank, out_features, config.tiles_per_program,
              v.stride(0), v.stride(1), B_pool.stride(0), B_pool.stride(1), y.stride(0))
    flags = dict(NUM_SPLITS=v.shape[0], BLOCK_N=config.block_n, BLOCK_R=config.block_r,
                 BLOCK_S=block_s(num_segments), USE_PDL=pdl, **_launch_opts(config, pdl))
    if config.block_m == 1:
        sgmv_expand_rows_kernel[grid](*common, **flags)
        return y
    sgmv_expand_kernel[grid](*common, BLOCK_M=config.block_m, PRECISION=_precision(y.dtype),
                             **flags)
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
) -> torch.Tensor:
    """y[rows] += scales[w] * (x[rows] @ A_pool[w, :r].T) @ B_pool[w, :r] per segment, in place.

    CUDA: shrink + expand kernels; `workspace` is a zeroed float32 buffer of at least
    `workspace_numel(T, max_rank)` elements, allocated once by the caller (required on CUDA);
    `shrink` / `expand` override the default launches (e.g. reduce=True, the row kernels).
    CPU: the torch reference (`workspace` unused). Returns y.
    """
    if x.device.type == "cpu" and not chk.interpreting():
        return add_lora_ref(y, x, A_pool, B_pool, indptr, slots, ranks, scales)
    num_tokens, max_rank = x.shape[0], A_pool.shape[1]
    shrink = shrink or shrink_config(num_tokens, slots.numel(), x.shape[1], max_rank)
    if workspace is None:
        raise ValueError("workspace: expected a zeroed float32 buffer of workspace_numel(T, "
                         "max_rank) elements (allocated once by the caller), got None")
    chk.check_vector("workspace", workspace, torch.float32, x.device)
    need = workspace_numel(num_tokens, max_rank)
    chk.expect(workspace.numel() >= need, "workspace.numel()", f">= {need}", workspace.numel())
    v, v_out, counters = workspace_views(workspace, shrink.num_splits, num_tokens, max_rank)
    sgmv_shrink(x, A_pool, indptr, slots, ranks, v, shrink, check_values, v_out, counters)
    expand = expand or expand_config(num_tokens, slots.numel(), y.shape[1], max_rank)
    expand = dataclasses.replace(expand, use_pdl=None)  # launched right after its shrink
    v_read = v_out if shrink.reduce else v
    return sgmv_expand(v_read, B_pool, indptr, slots, ranks, scales, y, expand, False)
