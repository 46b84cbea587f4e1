"""SGMV multi-LoRA ops: `sgmv_shrink`, `sgmv_expand` (Triton) and `add_lora` (dispatcher).

Meaning (see `lora_ref.py` for the same in plain torch). Segment i owns rows indptr[i]:indptr[i+1]
of the batch and uses adapter slot w = slots[i] (-1: no adapter, rows untouched):

    v.sum(0)[rows, :r] = x[rows] @ A_pool[w, :r].T          # shrink   x [T, in]  -> v [S_k, T, R]
    y[rows] += scales[w] * v.sum(0)[rows, :r] @ B_pool[w, :r] # expand   v         -> y [T, out]

with r = ranks[w], pools [num_slots, max_rank (R), features] indexed by int32 slot, v float32
split-K partials (see `lora_kernels.py`). Loading an adapter into slot w is one copy per pool:
``A_pool[w, :r] = lora_A.weight`` and ``B_pool[w, :r] = lora_B.weight.T``.

No call allocates or syncs with the host (value checks aside: `lora_checks.py`), so every call is
capturable in a CUDA graph. On CPU tensors `add_lora` runs the torch reference; the Triton wrappers
also run on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests the kernels).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import torch
import triton

from punica.ops import lora_checks as chk
from punica.ops.lora_kernels import sgmv_expand_kernel, sgmv_shrink_kernel
from punica.ops.lora_ref import add_lora_ref
from punica.ops.tiles import block_s, grid_rows

MAX_SPLITS = 16
SPLIT_ROWS_BUDGET = 4096  # num_splits * T never exceeds max(T, this): bounds workspace and v reads
MIN_K_PER_SPLIT = 256
# Shrink programs to aim for (about 8 per SM on an H200): the sweep in lora_op_sweep.json put
# 16 splits at bs 64 Distinct 19% ahead of 8 in the shrink + expand pair.
SHRINK_TARGET_PROGRAMS = 1024
# Expand (row tile x column tile) pairs per program are grouped until about this many programs.
EXPAND_TARGET_PROGRAMS = 512


@dataclass(frozen=True)
class ShrinkConfig:
    """Launch parameters of the shrink kernel."""

    block_m: int
    """Rows per tile (>= 16: tensor-core dot)."""
    block_r: int
    """Rank columns per program; rank tiles past a slot's rank exit at once."""
    block_k: int
    """Input features per loop step."""
    num_splits: int
    """Split-K factor: partials written to v[0:num_splits]."""
    num_warps: int = 4
    num_stages: int = 3
    use_pdl: bool | None = None
    """Programmatic dependent launch (Hopper+): None = on where the device supports it."""


@dataclass(frozen=True)
class ExpandConfig:
    """Launch parameters of the expand kernel."""

    block_m: int
    """Rows per tile (>= 16)."""
    block_n: int
    """Output features per program."""
    block_r: int = 16
    """Rank columns held at once; must be >= the pool's max_rank (a power of two >= 16)."""
    tiles_per_program: int = 1
    """Consecutive BLOCK_N column tiles per program (amortises the tile lookup and v load)."""
    num_warps: int = 4
    num_stages: int = 3
    use_pdl: bool | None = False
    """Overlap launch and tile lookup with the previous kernel: valid only right after
    sgmv_shrink (add_lora turns it on there). None = on where supported."""


def _block_m(num_tokens: int, num_segments: int) -> int:
    mean_len = num_tokens / max(num_segments, 1)
    return 16 if mean_len <= 16 else 32 if mean_len <= 32 else 64


def shrink_config(num_tokens: int, num_segments: int, in_features: int,
                  max_rank: int) -> ShrinkConfig:
    """Default shrink launch: enough split-K programs to stream A at full bandwidth."""
    block_m = _block_m(num_tokens, num_segments)
    block_r = min(64, max(16, triton.next_power_of_2(max_rank)))
    tiles = min(num_tokens, triton.cdiv(num_tokens, block_m) + num_segments)
    splits = 1
    while (splits * 2 <= MAX_SPLITS and tiles * splits < SHRINK_TARGET_PROGRAMS
           and in_features // (splits * 2) >= MIN_K_PER_SPLIT
           and splits * 2 * num_tokens <= max(num_tokens, SPLIT_ROWS_BUDGET)):
        splits *= 2
    return ShrinkConfig(block_m=block_m, block_r=block_r, block_k=64, num_splits=splits)


def expand_config(num_tokens: int, num_segments: int, out_features: int,
                  max_rank: int) -> ExpandConfig:
    """Default expand launch."""
    block_m = _block_m(num_tokens, num_segments)
    block_r = max(16, triton.next_power_of_2(max_rank))
    block_n = max(32, min(256 if block_m == 16 else 128, 8192 // block_r))
    tiles = grid_rows(num_tokens, num_segments, block_m) * triton.cdiv(out_features, block_n)
    per_program = max(1, min(8, tiles // EXPAND_TARGET_PROGRAMS))
    return ExpandConfig(block_m=block_m, block_n=block_n, block_r=block_r,
                        tiles_per_program=per_program)


def workspace_numel(max_tokens: int, max_rank: int) -> int:
    """Float32 elements a workspace needs for any call of up to `max_tokens` rows."""
    return max(max_tokens, SPLIT_ROWS_BUDGET) * max_rank


def _precision(dtype: torch.dtype) -> str:
    # fp32 models: exact fp32 dots. fp16/bf16: the shrink's dot is 16-bit x 16-bit -> fp32; the
    # expand multiplies fp32 v in tf32 (10-bit mantissa, 8-bit exponent): at least the precision of
    # the fp16/bf16 output it is added to, and v never overflows as a 16-bit v could.
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def _pdl_supported(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _use_pdl(flag: bool | None, device: torch.device) -> bool:
    if _interpreting() or device.type != "cuda" or flag is False:
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
) -> torch.Tensor:
    """v.sum(0)[rows, :r] = x[rows] @ A_pool[w, :r].T per segment; v [num_splits, T, max_rank] fp32.

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
    if chk.should_check_values(x, check_values):
        chk.check_values(indptr, slots, ranks, num_tokens, max_rank)
    if num_tokens == 0 or num_segments == 0:
        return v
    pdl = _use_pdl(config.use_pdl, x.device)
    k_per_split = triton.cdiv(triton.cdiv(in_features, config.num_splits), config.block_k)
    grid = (grid_rows(num_tokens, num_segments, config.block_m),
            triton.cdiv(max_rank, config.block_r), config.num_splits)
    sgmv_shrink_kernel[grid](
        x, A_pool, v, indptr, slots, ranks,
        num_segments, num_slots, max_rank, in_features, k_per_split * config.block_k,
        x.stride(0), A_pool.stride(0), A_pool.stride(1), v.stride(0), v.stride(1),
        BLOCK_M=config.block_m, BLOCK_R=config.block_r,
        BLOCK_K=config.block_k, BLOCK_S=block_s(num_segments), PRECISION=_precision(x.dtype),
        # Triton's CPU interpreter multiplies bf16 tiles as raw uint16 bits in tl.dot: upcast there.
        DOT_IN_FP32=_interpreting() and x.dtype == torch.bfloat16, USE_PDL=pdl,
        **_launch_opts(config, pdl),
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
    sgmv_expand_kernel[grid](
        v, B_pool, y, indptr, slots, ranks, scales,
        num_segments, num_slots, max_rank, out_features, config.tiles_per_program,
        v.stride(0), v.stride(1), B_pool.stride(0), B_pool.stride(1), y.stride(0),
        NUM_SPLITS=v.shape[0], BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, BLOCK_R=config.block_r, BLOCK_S=block_s(num_segments),
        PRECISION=_precision(y.dtype), USE_PDL=pdl, **_launch_opts(config, pdl),
    )
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
) -> torch.Tensor:
    """y[rows] += scales[w] * (x[rows] @ A_pool[w, :r].T) @ B_pool[w, :r] per segment, in place.

    CUDA: shrink + expand kernels; `workspace` is a float32 buffer of at least
    `workspace_numel(T, max_rank)` elements, allocated once by the caller (required on CUDA).
    CPU: the torch reference (`workspace` unused). Returns y.
    """
    if x.device.type == "cpu" and not _interpreting():
        return add_lora_ref(y, x, A_pool, B_pool, indptr, slots, ranks, scales)
    num_tokens, max_rank = x.shape[0], A_pool.shape[1]
    shrink = shrink_config(num_tokens, slots.numel(), x.shape[1], max_rank)
    needed = shrink.num_splits * num_tokens * max_rank
    if workspace is None:
        raise ValueError("workspace: expected a float32 buffer of workspace_numel(T, max_rank) "
                         "elements (allocated once by the caller), got None")
    chk.check_vector("workspace", workspace, torch.float32, x.device)
    chk.expect(workspace.numel() >= needed, "workspace.numel()", f">= {needed}",
               workspace.numel())
    v = workspace[:needed].view(shrink.num_splits, num_tokens, max_rank)
    sgmv_shrink(x, A_pool, indptr, slots, ranks, v, shrink, check_values)
    expand = expand_config(num_tokens, slots.numel(), y.shape[1], max_rank)
    expand = dataclasses.replace(expand, use_pdl=None)  # launched right after its shrink
    return sgmv_expand(v, B_pool, indptr, slots, ranks, scales, y, expand, False)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
