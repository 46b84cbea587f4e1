"""Pure-torch references of the fused elementwise ops (`fused.py`), with HF Llama's rounding points.

    rms_norm_ref(x, w, eps)            = w * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(dtype)
    add_rms_norm_ref(x, residual, w)   : residual = (residual + x) in dtype (in place), then
                                         rms_norm_ref(residual, w)
    rotary_ref(x, cos, sin)            = (x.float() * cos + rotate_half(x.float()) * sin).to(dtype)
    silu_and_mul_ref(gate, up)         = silu(gate) * up  (fp32 inside, one rounding)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D], weight [D] -> [..., D] of x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x); the sum is written into `residual`."""
    residual.add_(x)
    return rms_norm_ref(residual, weight, eps), residual


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, D] (rotate-half form) by cos/sin [T, 1, D]."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def silu_and_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)
