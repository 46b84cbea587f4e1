"""Fused elementwise ops of a decoder layer (Triton on CUDA or under the interpreter, the torch
references of `fused_ref.py` on plain CPU tensors).

    rms_norm(x, weight, eps)                 x [T, D] -> [T, D]
    add_rms_norm(x, residual, weight, eps)   residual += x (in place);
                                             -> (rms_norm(residual), residual)
    rotary_(x, positions, cos, sin)          x [T, H, D] rotated in place by the rows' positions;
                                             cos/sin [max_len, D] (both halves equal, as `Rotary`)
    silu_and_mul(gate, up)                   [T, N] -> silu(gate) * up

No host sync and no allocation beyond each op's output: capturable in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton

from punica.ops import fused_ref
from punica.ops.checks import ACT_DTYPES, expect, interpreting
from punica.ops.fused_kernels import rms_norm_kernel, rotary_kernel, silu_and_mul_kernel


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


def _norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
          eps: float) -> torch.Tensor:
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.shape[0] == 0:
        return out
    res = residual if residual is not None else x
    rms_norm_kernel[(x.shape[0],)](
        x, res, weight, out, x.shape[1], eps, x.stride(0), res.stride(0), out.stride(0),
        ADD=residual is not None, BLOCK_D=triton.next_power_of_2(x.shape[1]),
        num_warps=4 if x.shape[1] <= 4096 else 8)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * normalize(x) per row; x [T, D] fp16/bf16/fp32, weight [D] of x's dtype."""
    _check_rows("x", x)
    _check_weight(weight, x)
    if not _use_triton(x):
        return fused_ref.rms_norm_ref(x, weight, eps)
    return _norm(x, None, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual += x (rounded to its dtype, in place); returns (rms_norm(residual), residual)."""
    _check_rows("x", x)
    _check_rows("residual", residual, x.shape[1])
    expect(residual.shape == x.shape and residual.dtype == x.dtype, "residual",
           f"a {x.dtype} tensor of shape {tuple(x.shape)}", (tuple(residual.shape),
                                                            residual.dtype))
    _check_weight(weight, x)
    if not _use_triton(x):
        return fused_ref.add_rms_norm_ref(x, residual, weight, eps)
    return _norm(x, residual, weight, eps), residual


def rotary_(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, D] in place by the tables' rows at `positions` (int64 [T]); returns x."""
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
    if not _use_triton(x):
        x.copy_(fused_ref.rotary_ref(x, cos[positions][:, None], sin[positions][:, None]))
        return x
    if T == 0:
        return x
    block_h = min(triton.next_power_of_2(H), 8)
    rotary_kernel[(T, triton.cdiv(H, block_h))](
        x, positions, cos, sin, H, x.stride(0), x.stride(1), cos.stride(0),
        HALF=D // 2, BLOCK_H=block_h, num_warps=2)
    return x


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, gate/up [T, N] of one dtype (fp32 inside, one rounding)."""
    _check_rows("gate", gate)
    _check_rows("up", up, gate.shape[1])
    expect(up.shape == gate.shape and up.dtype == gate.dtype, "up",
           f"a {gate.dtype} tensor of shape {tuple(gate.shape)}", (tuple(up.shape), up.dtype))
    if not _use_triton(gate):
        return fused_ref.silu_and_mul_ref(gate, up)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if gate.shape[0] == 0:
        return out
    block_n = min(triton.next_power_of_2(gate.shape[1]), 1024)
    silu_and_mul_kernel[(gate.shape[0], triton.cdiv(gate.shape[1], block_n))](
        gate, up, out, gate.shape[1], gate.stride(0), up.stride(0), out.stride(0),
        BLOCK_N=block_n, num_warps=4)
    return out
