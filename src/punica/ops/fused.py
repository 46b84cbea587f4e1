"""Fused elementwise ops of a decoder layer (Triton on CUDA or under the interpreter, the torch
references of `fused_ref.py` on plain CPU tensors).

    rms_norm(x, weight, eps)                 x [T, D] -> [T, D]
    add_rms_norm(x, residual, weight, eps)   residual += x (in place);
                                             -> (rms_norm(residual), residual)
    rotary_(x, positions, cos, sin)          x [T, H, D] rotated in place by the rows' positions;
                                             cos/sin [max_len, D] (both halves equal, as `Rotary`)
    silu_and_mul(gate, up)                   [T, N] -> silu(gate) * up

Each op takes `triton=False` to run its torch reference whatever the device (the model's torch
backend: the engine on a plain CPU stays off the interpreter even in a test session that set it).
No host sync and no allocation beyond each op's output: capturable in a CUDA graph. Checks and
launch parameters are derived once per argument signature and the compiled kernel relaunched
directly (`launch.py`), as the SGMV and attention wrappers do.
"""

from __future__ import annotations

import torch

from punica.ops import fused_ref
from punica.ops.checks import ACT_DTYPES, expect, interpreting
from punica.ops.fused_kernels import rms_norm_kernel, rotary_kernel, silu_and_mul_kernel
from punica.ops.launch import KernelLaunch, PlanCache, cdiv, next_power_of_2, sig

_NORM: PlanCache[KernelLaunch | None] = PlanCache()
_ROTARY: PlanCache[KernelLaunch | None] = PlanCache()
_SILU: PlanCache[KernelLaunch | None] = PlanCache()


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or interpreting()


def _check_rows(name: str, t: torch.Tensor, cols: int | None = None) -> None:
    expect(t.dim() == 2, name, "a 2-D tensor [num_tokens, features]", tuple(t.shape))
    expect(t.dtype in ACT_DTYPES, f"{name}.dtype", "float16, bfloat16 or float32", t.dtype)
    expect(t.stride(1) == 1, f"{name}.stride(1)", "1 (rows contiguous)", t.stride(1))
    if cols is not None:
        expect(t.shape[1] == cols, f"{name}.shape[1]", str(cols), t.shape[1])


def _check_weight(weight: torch.Tensor, x: torch.Tensor) -> None:
    expect(weight.dim() == 1 and weight.numel() == x.shape[1] and weight.is_contiguous(),
           "weight", f"a contiguous 1-D tensor of {x.shape[1]} elements",
           (tuple(weight.shape), weight.stride()))
    expect(weight.dtype == x.dtype, "weight.dtype", str(x.dtype), weight.dtype)
    expect(weight.device == x.device, "weight.device", str(x.device), weight.device)


def _norm_plan(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
               eps: float) -> KernelLaunch | None:
    _check_rows("x", x)
    if residual is not None:
        _check_rows("residual", residual, x.shape[1])
        expect(residual.shape == x.shape and residual.dtype == x.dtype, "residual",
               f"a {x.dtype} tensor of shape {tuple(x.shape)}",
               (tuple(residual.shape), residual.dtype))
    _check_weight(weight, x)
    if x.shape[0] == 0 or not _use_triton(x):
        return None
    res = residual if residual is not None else x
    dim = x.shape[1]
    return KernelLaunch(
        rms_norm_kernel, (x.shape[0],), 4, (dim, eps, x.stride(0), res.stride(0), dim),
        dict(ADD=residual is not None, BLOCK_D=next_power_of_2(dim)),
        dict(num_warps=4 if dim <= 4096 else 8))


def _norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
          eps: float) -> torch.Tensor | None:
    """The Triton result, or None where the reference runs (plain CPU tensors)."""
    key = (sig(x), sig(residual), sig(weight), eps)
    launch = _NORM.get(key, _norm_plan, x, residual, weight, eps)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if launch is None:
        return out if x.shape[0] == 0 else None
    launch(x, residual if residual is not None else x, weight, out)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             triton: bool = True) -> torch.Tensor:
    """weight * normalize(x) per row; x [T, D] fp16/bf16/fp32, weight [D] of x's dtype."""
    out = _norm(x, None, weight, eps) if triton else None
    return fused_ref.rms_norm_ref(x, weight, eps) if out is None else out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float, triton: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += x (rounded to its dtype, in place); returns (rms_norm(residual), residual)."""
    out = _norm(x, residual, weight, eps) if triton else None
    if out is None:
        return fused_ref.add_rms_norm_ref(x, residual, weight, eps)
    return out, residual


def rotary_(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor, triton: bool = True) -> torch.Tensor:
    """Rotate x [T, H, D] in place by the tables' rows at `positions` (int64 [T]); returns x."""
    if not triton:
        x.copy_(fused_ref.rotary_ref(x, cos[positions][:, None], sin[positions][:, None]))
        return x
    key = (sig(x), sig(positions), sig(cos), sig(sin))
    launch = _ROTARY.get(key, _rotary_plan, x, positions, cos, sin)
    if launch is not None:
        launch(x, positions, cos, sin)
    elif not _use_triton(x):
        x.copy_(fused_ref.rotary_ref(x, cos[positions][:, None], sin[positions][:, None]))
    return x


def _rotary_plan(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> KernelLaunch | None:
    expect(x.dim() == 3 and x.stride(2) == 1, "x", "a [T, heads, head_dim] tensor with unit "
           "last stride", (tuple(x.shape), x.stride()))
    T, H, D = x.shape
    expect(D % 2 == 0 and (D // 2) & (D // 2 - 1) == 0, "x.shape[2]",
           "an even head_dim whose half is a power of two", D)
    expect(positions.shape == (T,) and positions.dtype == torch.int64, "positions",
           f"an int64 tensor of shape ({T},)", (tuple(positions.shape), positions.dtype))
    for name, table in (("cos", cos), ("sin", sin)):
        expect(table.dim() == 2 and table.shape[1] == D and table.dtype == torch.float32
               and table.is_contiguous(), name, f"a contiguous float32 [max_len, {D}] table",
               (tuple(table.shape), table.dtype))
    if T == 0 or not _use_triton(x):
        return None
    block_h = min(next_power_of_2(H), 8)
    return KernelLaunch(rotary_kernel, (T, cdiv(H, block_h)), 4,
                        (H, x.stride(0), x.stride(1), cos.stride(0)),
                        dict(HALF=D // 2, BLOCK_H=block_h), dict(num_warps=2))


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor, triton: bool = True) -> torch.Tensor:
    """silu(gate) * up, gate/up [T, N] of one dtype (fp32 inside, one rounding)."""
    if not triton:
        return fused_ref.silu_and_mul_ref(gate, up)
    launch = _SILU.get((sig(gate), sig(up)), _silu_plan, gate, up)
    if launch is None and not _use_triton(gate):
        return fused_ref.silu_and_mul_ref(gate, up)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if launch is not None:
        launch(gate, up, out)
    return out


def _silu_plan(gate: torch.Tensor, up: torch.Tensor) -> KernelLaunch | None:
    _check_rows("gate", gate)
    _check_rows("up", up, gate.shape[1])
    expect(up.shape == gate.shape and up.dtype == gate.dtype, "up",
           f"a {gate.dtype} tensor of shape {tuple(gate.shape)}", (tuple(up.shape), up.dtype))
    if gate.shape[0] == 0 or not _use_triton(gate):
        return None
    n = gate.shape[1]
    block_n = min(next_power_of_2(n), 1024)
    return KernelLaunch(silu_and_mul_kernel, (gate.shape[0], cdiv(n, block_n)), 3,
                        (n, gate.stride(0), up.stride(0), n), dict(BLOCK_N=block_n),
                        dict(num_warps=4))
