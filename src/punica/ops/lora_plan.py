"""Launch plans of the SGMV wrappers: every argument check and launch parameter of a call, built
once per argument signature (`launch.sig` of each tensor, the configs; `launch.PlanCache` adds
`launch.launch_env()`, the interpreter setting that PDL, fences and bf16 dots follow) and reused
while it holds. PDL also follows the device's compute capability, fixed by the device in `sig`.

A plan's checks depend only on what the signature fixes (shapes, strides, dtypes, devices, the
configs), so a call whose signature has a plan passes them; a new signature builds a plan, and
the checks raise there. Segment values are not part of it: `checks.check_values` runs per call
when asked.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from punica.ops import checks as chk
from punica.ops.launch import KernelLaunch, cdiv
from punica.ops.lora_config import (
    ExpandConfig,
    ShrinkConfig,
    expand_config,
    shrink_config,
    workspace_numel,
    workspace_views,
)
from punica.ops.lora_kernels import sgmv_expand_kernel, sgmv_shrink_kernel
from punica.ops.lora_row_kernels import sgmv_expand_rows_kernel, sgmv_shrink_rows_kernel
from punica.ops.tiles import block_s, grid_rows


def _precision(dtype: torch.dtype) -> str:
    # fp32 models: exact fp32 dots. fp16/bf16: the shrink's dot is 16-bit x 16-bit -> fp32; the
    # expand multiplies fp32 v in tf32 (10-bit mantissa, 8-bit exponent): at least the precision of
    # the fp16/bf16 output it is added to, and v never overflows as a 16-bit v could.
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def _pdl_supported(device_index: int) -> bool:
    """Compute capability >= 9.0 (fixed per device index for the life of the process)."""
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _use_pdl(flag: bool | None, device: torch.device) -> bool:
    if chk.interpreting() or device.type != "cuda" or flag is False:
        return False
    supported = _pdl_supported(device.index if device.index is not None else 0)
    if flag and not supported:
        raise ValueError("use_pdl: expected a device of compute capability >= 9.0 (Hopper), "
                         f"got {torch.cuda.get_device_name(device)}")
    return supported


def _launch_opts(config: ShrinkConfig | ExpandConfig, pdl: bool) -> dict[str, object]:
    opts: dict[str, object] = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    if pdl:
        opts["launch_pdl"] = True
    return opts


@dataclass(frozen=True, slots=True)
class ShrinkPlan:
    launch: KernelLaunch | None
    """None: nothing to launch (no rows or no segments)."""
    num_tokens: int
    max_rank: int
    reduce: bool
    cpu: bool


@dataclass(frozen=True, slots=True)
class ExpandPlan:
    launch: KernelLaunch | None
    num_tokens: int
    max_rank: int
    cpu: bool


def _slice_stride(table: torch.Tensor, num_slices: int) -> int:
    return table.stride(0) if num_slices > 1 else 0


def shrink_plan(x: torch.Tensor, A_pool: torch.Tensor, indptr: torch.Tensor,
                slots: torch.Tensor, ranks: torch.Tensor, v: torch.Tensor,
                config: ShrinkConfig | None, v_out: torch.Tensor | None,
                counters: torch.Tensor | None, num_slices: int = 1) -> ShrinkPlan:
    """Checks of `sgmv_shrink` (ValueError naming the argument) and its launch; with
    num_slices > 1, A_pool holds the slices' rows side by side (lora_kernels.py)."""
    chk.check_activation("x", x)
    num_tokens, in_features = x.shape
    chk.check_pool("A_pool", A_pool, x.dtype, x.device, in_features)
    num_slots, width, _ = A_pool.shape
    chk.expect(width % num_slices == 0, "A_pool.shape[1]",
               f"num_slices ({num_slices}) x the slice rank", width)
    max_rank = width // num_slices
    chk.check_segments(indptr, slots, ranks, x.device, num_slots, num_slices)
    chk.check_workspace(v, num_tokens, width, x.device)
    num_segments = slots.numel()
    if config is None:
        config = shrink_config(num_tokens, num_segments, in_features, max_rank, num_slices)
    chk.expect(v.shape[0] == config.num_splits, "v.shape[0]",
               f"num_splits = {config.num_splits}", v.shape[0])
    if config.reduce:
        chk.expect(v_out is not None and tuple(v_out.shape) == (1, num_tokens, width)
                   and v_out.dtype == torch.float32 and v_out.is_contiguous(), "v_out",
                   f"a contiguous float32 [1, {num_tokens}, {width}] tensor (config.reduce)",
                   None if v_out is None else (tuple(v_out.shape), v_out.dtype))
        need = num_tokens * num_slices * cdiv(max_rank, 16)
        chk.expect(counters is not None and counters.dtype == torch.int32
                   and counters.numel() >= need, "counters",
                   f"a zeroed int32 tensor of >= {need} elements (config.reduce)",
                   None if counters is None else (counters.numel(), counters.dtype))
    cpu = x.device.type == "cpu"
    if num_tokens == 0 or num_segments == 0:
        return ShrinkPlan(None, num_tokens, max_rank, config.reduce, cpu)
    pdl = _use_pdl(config.use_pdl, x.device)
    k_per_split = cdiv(cdiv(in_features, config.num_splits), config.block_k)
    tiles_per_slice = cdiv(max_rank, config.block_r)
    grid = (grid_rows(num_tokens, num_segments, config.block_m),
            num_slices * tiles_per_slice, config.num_splits)
    v_out = v_out if config.reduce else v
    scalars = (num_segments, num_slots, max_rank, in_features, k_per_split * config.block_k,
               grid[1], tiles_per_slice, _slice_stride(ranks, num_slices), x.stride(0),
               A_pool.stride(0), A_pool.stride(1), v.stride(0), v.stride(1), v_out.stride(1))
    flags: dict[str, object] = dict(
        BLOCK_R=config.block_r, BLOCK_K=config.block_k, BLOCK_S=block_s(num_segments),
        USE_PDL=pdl, REDUCE=config.reduce, NUM_SPLITS=config.num_splits,
        FENCE=not chk.interpreting())
    kernel = sgmv_shrink_rows_kernel
    if config.block_m != 1:
        kernel = sgmv_shrink_kernel
        # Triton's CPU interpreter multiplies bf16 tiles as raw uint16 bits in tl.dot: upcast.
        flags.update(BLOCK_M=config.block_m, PRECISION=_precision(x.dtype),
                     DOT_IN_FP32=chk.interpreting() and x.dtype == torch.bfloat16)
    launch = KernelLaunch(kernel, grid, 8, scalars, flags, _launch_opts(config, pdl))
    return ShrinkPlan(launch, num_tokens, max_rank, config.reduce, cpu)


def expand_plan(v: torch.Tensor, B_pool: torch.Tensor, indptr: torch.Tensor,
                slots: torch.Tensor, ranks: torch.Tensor, scales: torch.Tensor, y: torch.Tensor,
                config: ExpandConfig | None, slices: tuple[int, ...] = (),
                early_y: bool = True) -> ExpandPlan:
    """Checks of `sgmv_expand` (ValueError naming the argument) and its launch; `slices`: the
    output widths of the LoRA slices (lora_kernels.py), () for one; early_y: y is complete
    before the PDL wait (the expand follows its shrink), so the row kernel may prefetch it."""
    chk.check_activation("y", y)
    num_tokens, out_features = y.shape
    chk.check_pool("B_pool", B_pool, y.dtype, y.device, out_features)
    num_slots, max_rank, _ = B_pool.shape
    num_slices = chk.check_slices(slices, out_features)
    chk.check_segments(indptr, slots, ranks, y.device, num_slots, num_slices)
    chk.check_slice_table("scales", scales, torch.float32, y.device, num_slices, num_slots)
    chk.expect(num_slices == 1 or scales.stride(0) == ranks.stride(0), "scales.stride(0)",
               f"ranks.stride(0) ({ranks.stride(0)})", scales.stride(0))
    chk.check_workspace(v, num_tokens, num_slices * max_rank, y.device)
    num_segments = slots.numel()
    if config is None:
        config = expand_config(num_tokens, num_segments, out_features, max_rank)
    chk.expect(config.block_r >= max_rank, "config.block_r", f">= max_rank ({max_rank})",
               config.block_r)
    cpu = y.device.type == "cpu"
    if num_tokens == 0 or num_segments == 0:
        return ExpandPlan(None, num_tokens, max_rank, cpu)
    pdl = _use_pdl(config.use_pdl, y.device)
    span = config.block_n * config.tiles_per_program
    widths = slices or (out_features,)
    bounds = [sum(widths[:i + 1]) for i in range(len(widths))] + [out_features] * 2
    grid = (grid_rows(num_tokens, num_segments, config.block_m), cdiv(max(widths), span),
            num_slices)
    scalars = (num_segments, num_slots, max_rank, out_features, config.tiles_per_program,
               _slice_stride(ranks, num_slices), bounds[0], bounds[1], v.stride(0),
               v.stride(1), B_pool.stride(0), B_pool.stride(1), y.stride(0))
    flags: dict[str, object] = dict(
        NUM_SPLITS=v.shape[0], BLOCK_N=config.block_n, BLOCK_R=config.block_r,
        BLOCK_S=block_s(num_segments), USE_PDL=pdl)
    kernel = sgmv_expand_rows_kernel
    if config.block_m == 1:
        flags.update(PREFETCH=config.prefetch, EARLY_Y=early_y)
    else:
        kernel = sgmv_expand_kernel
        flags.update(BLOCK_M=config.block_m, PRECISION=_precision(y.dtype))
    launch = KernelLaunch(kernel, grid, 7, scalars, flags, _launch_opts(config, pdl))
    return ExpandPlan(launch, num_tokens, max_rank, cpu)


class AddLoraPlan:
    """Shrink + expand of one `add_lora` signature, and the workspace views of the last
    workspace it ran on (kept with the workspace itself and its address, so they are reused
    only for that very buffer)."""

    __slots__ = ("shrink", "expand", "num_splits", "num_slices", "cpu", "_views")

    def __init__(self, shrink: ShrinkPlan, expand: ExpandPlan, num_splits: int,
                 num_slices: int = 1) -> None:
        self.shrink, self.expand, self.num_splits = shrink, expand, num_splits
        self.num_slices = num_slices
        self.cpu = shrink.cpu
        self._views: tuple[torch.Tensor, int, tuple[torch.Tensor, ...]] | None = None

    def views(self, workspace: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cached = self._views
        if cached is not None and cached[0] is workspace and cached[1] == workspace.data_ptr():
            return cached[2]
        views = workspace_views(workspace, self.num_splits, self.shrink.num_tokens,
                                self.shrink.max_rank, self.num_slices)
        self._views = (workspace, workspace.data_ptr(), views)
        return views


def add_lora_plan(y: torch.Tensor, x: torch.Tensor, A_pool: torch.Tensor, B_pool: torch.Tensor,
                  indptr: torch.Tensor, slots: torch.Tensor, ranks: torch.Tensor,
                  scales: torch.Tensor, workspace: torch.Tensor | None,
                  shrink: ShrinkConfig | None, expand: ExpandConfig | None,
                  slices: tuple[int, ...] = (), beside: bool = False) -> AddLoraPlan:
    """Checks of `add_lora` (the workspace, then those of its shrink and expand).

    beside: the shrink runs on a side stream while the GEMM that writes y runs, and the expand
    follows that GEMM (`add_lora_beside`): the shrink without PDL (nothing before it on its
    stream), the expand with PDL behind the GEMM, reading y only after its wait."""
    chk.check_activation("y", y)
    num_slices = chk.check_slices(slices, y.shape[1])
    num_tokens, max_rank = x.shape[0], B_pool.shape[1]
    shrink = shrink or shrink_config(num_tokens, slots.numel(), x.shape[1], max_rank,
                                     num_slices)
    if workspace is None:
        raise ValueError("workspace: expected a zeroed float32 buffer of workspace_numel(T, "
                         "max_rank, num_slices) elements (allocated once by the caller), "
                         "got None")
    chk.check_vector("workspace", workspace, torch.float32, x.device)
    need = workspace_numel(num_tokens, max_rank, num_slices)
    chk.expect(workspace.numel() >= need, "workspace.numel()", f">= {need}", workspace.numel())
    v, v_out, counters = workspace_views(workspace, shrink.num_splits, num_tokens, max_rank,
                                         num_slices)
    if beside:
        shrink = dataclasses.replace(shrink, use_pdl=False)
    s_plan = shrink_plan(x, A_pool, indptr, slots, ranks, v, shrink, v_out, counters,
                         num_slices)
    expand = expand or expand_config(num_tokens, slots.numel(), y.shape[1], max_rank)
    expand = dataclasses.replace(expand, use_pdl=None)  # launched right after its shrink/GEMM
    e_plan = expand_plan(v_out if shrink.reduce else v, B_pool, indptr, slots, ranks, scales, y,
                         expand, slices, early_y=not beside)
    return AddLoraPlan(s_plan, e_plan, shrink.num_splits, num_slices)
