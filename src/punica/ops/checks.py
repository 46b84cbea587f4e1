"""Argument checks of the ops (SGMV, attention): shapes, dtypes, devices and strides, then
(optionally) the SGMV segment values.

Every failure is a `ValueError` naming the argument and what was expected. Value checks read the
segment table and the per-slot ranks, which on a GPU is a host sync: they always run for CPU
tensors, and for CUDA tensors only when asked (`check_values=True`). The engine builds its segment
table on the host and validates it there before the single upload per step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_SLICES = 3  # LoRA slices of one fused projection (q/k/v); the expand's column bounds


def expect(ok: bool, name: str, expected: str, got: object) -> None:
    if not ok:
        raise ValueError(f"{name}: expected {expected}, got {got}")


def check_activation(name: str, t: torch.Tensor, cols: int | None = None) -> None:
    """A 2-D [T, features] activation of fp16/bf16/fp32 with unit column stride."""
    expect(t.dim() == 2, name, "a 2-D tensor [num_tokens, features]", tuple(t.shape))
    expect(t.dtype in ACT_DTYPES, f"{name}.dtype", "float16, bfloat16 or float32", t.dtype)
    expect(t.stride(1) == 1 or t.shape[1] <= 1, f"{name}.stride(1)", "1 (rows contiguous)",
           t.stride(1))
    if cols is not None:
        expect(t.shape[1] == cols, f"{name}.shape[1]", str(cols), t.shape[1])


def check_pool(name: str, pool: torch.Tensor, dtype: torch.dtype, device: torch.device,
               features: int) -> None:
    """A contiguous [num_slots, max_rank, features] weight pool matching the activations."""
    expect(pool.dim() == 3, name, "a 3-D tensor [num_slots, max_rank, features]",
           tuple(pool.shape))
    expect(pool.is_contiguous(), name, "a contiguous tensor", f"strides {pool.stride()}")
    expect(pool.dtype == dtype, f"{name}.dtype", str(dtype), pool.dtype)
    expect(pool.device == device, f"{name}.device", str(device), pool.device)
    expect(pool.shape[2] == features, f"{name}.shape[2]", str(features), pool.shape[2])
    expect(pool.shape[1] >= 1, f"{name}.shape[1] (max_rank)", ">= 1", pool.shape[1])


def check_vector(name: str, t: torch.Tensor, dtype: torch.dtype, device: torch.device,
                 numel: int | None = None) -> None:
    expect(t.dim() == 1, name, "a 1-D tensor", tuple(t.shape))
    expect(t.dtype == dtype, f"{name}.dtype", str(dtype), t.dtype)
    expect(t.device == device, f"{name}.device", str(device), t.device)
    expect(t.is_contiguous(), name, "a contiguous tensor", f"stride {t.stride()}")
    if numel is not None:
        expect(t.numel() == numel, f"{name}.numel()", str(numel), t.numel())


def check_slice_table(name: str, t: torch.Tensor, dtype: torch.dtype, device: torch.device,
                      num_slices: int, num_slots: int) -> None:
    """Per-slot values of each LoRA slice: [num_slots] for one slice, else [num_slices,
    num_slots] with contiguous rows (any row stride)."""
    if num_slices == 1:
        check_vector(name, t, dtype, device, num_slots)
        return
    expect(tuple(t.shape) == (num_slices, num_slots), f"{name}.shape",
           f"[num_slices, num_slots] = {[num_slices, num_slots]}", list(t.shape))
    expect(t.dtype == dtype, f"{name}.dtype", str(dtype), t.dtype)
    expect(t.device == device, f"{name}.device", str(device), t.device)
    expect(t.stride(1) == 1, f"{name}.stride(1)", "1 (rows contiguous)", t.stride(1))


def check_segments(indptr: torch.Tensor, slots: torch.Tensor, ranks: torch.Tensor,
                   device: torch.device, num_slots: int, num_slices: int = 1) -> None:
    check_vector("slots", slots, torch.int32, device)
    check_vector("indptr", indptr, torch.int32, device, slots.numel() + 1)
    check_slice_table("ranks", ranks, torch.int32, device, num_slices, num_slots)


def check_slices(slices: tuple[int, ...], out_features: int) -> int:
    """The number of LoRA slices of `slices` (output widths; () = one slice of all columns)."""
    if not slices:
        return 1
    expect(2 <= len(slices) <= MAX_SLICES, "len(slices)", f"2..{MAX_SLICES} (or () for one)",
           len(slices))
    expect(all(w >= 1 for w in slices), "slices", "positive widths", slices)
    expect(sum(slices) == out_features, "sum(slices)", f"the output width {out_features}",
           sum(slices))
    return len(slices)


def check_workspace(v: torch.Tensor, num_tokens: int, max_rank: int,
                    device: torch.device) -> None:
    """v: contiguous float32 [num_splits, num_tokens, max_rank]."""
    expect(v.dim() == 3, "v", "a 3-D tensor [num_splits, num_tokens, max_rank]", tuple(v.shape))
    expect(v.dtype == torch.float32, "v.dtype", "torch.float32", v.dtype)
    expect(v.device == device, "v.device", str(device), v.device)
    expect(v.is_contiguous(), "v", "a contiguous tensor", f"strides {v.stride()}")
    expect(v.shape[0] >= 1, "v.shape[0] (num_splits)", ">= 1", v.shape[0])
    expect(tuple(v.shape[1:]) == (num_tokens, max_rank), "v.shape[1:]",
           str((num_tokens, max_rank)), tuple(v.shape[1:]))


def check_values(indptr: torch.Tensor, slots: torch.Tensor, ranks: torch.Tensor,
                 num_tokens: int, max_rank: int) -> None:
    """indptr: 0, non-decreasing, <= T; slots in [-1, num_slots); ranks in [0, max_rank]."""
    bounds = indptr.tolist()
    expect(bounds[0] == 0, "indptr[0]", "0", bounds[0])
    bad = [i for i in range(len(bounds) - 1) if bounds[i + 1] < bounds[i]]
    expect(not bad, "indptr", "a non-decreasing sequence", f"a decrease after index {bad[:1]}")
    expect(bounds[-1] <= num_tokens, "indptr[-1]", f"<= num_tokens ({num_tokens})", bounds[-1])
    num_slots = ranks.shape[-1]
    out = [w for w in slots.tolist() if not -1 <= w < num_slots]
    expect(not out, "slots", f"values in [-1, {num_slots}) (-1 = no adapter)", out[:4])
    flat = ranks.reshape(-1).tolist()
    over = [(i % num_slots, r) for i, r in enumerate(flat) if not 0 <= r <= max_rank]
    expect(not over, "ranks", f"values in [0, {max_rank}] (the pool's max_rank)",
           f"(slot, rank) {over[:4]}")


def should_check_values(tensor: torch.Tensor, check_values_flag: bool | None) -> bool:
    if check_values_flag is None:
        return tensor.device.type == "cpu"
    return check_values_flag


_INTERPRET: bool | None = None
"""The setting of `interpreting()`; None: not decided yet (then: as the kernels were built)."""


def interpreting() -> bool:
    """True when the op wrappers treat the Triton kernels as interpreted: they launch them on CPU
    tensors, without PDL or GPU fences, and upcast bf16 dots (the interpreter multiplies bf16 as
    raw bits). Launch plans depend on it, so `launch.PlanCache` keys hold it.

    By default: whether Triton's interpreter runs the kernels, i.e. TRITON_INTERPRET=1 when the
    kernel modules were imported (triton.jit reads it as it decorates them; set later, it changes
    nothing). `use_interpreter` sets it explicitly.
    """
    global _INTERPRET
    if _INTERPRET is None:
        from triton.runtime.interpreter import InterpretedFunction

        from punica.ops.tiles import locate_tile

        _INTERPRET = isinstance(locate_tile, InterpretedFunction)
    return _INTERPRET


@contextlib.contextmanager
def use_interpreter(on: bool | None) -> Iterator[None]:
    """Within: `interpreting()` is `on` (None: as the kernels were built). E.g. True to time the
    wrappers' host path on CPU tensors under `launch_stub.null_launches`, whose kernels are
    compiled objects; False to run the references on CPU tensors in an interpreted session."""
    global _INTERPRET
    before, _INTERPRET = _INTERPRET, on
    try:
        yield
    finally:
        _INTERPRET = before
