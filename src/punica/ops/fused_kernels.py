"""Triton kernels of the fused elementwise ops: one program per row, the whole row in registers.

Each replaces a chain of small torch kernels of a decoder layer (a 7B decode step ran ~650 of
them, ~2.9 ms of its 11.5: `benchmarks/results/step_profile.json`). Rounding points follow
`fused_ref.py`: sums in the activation dtype where HF rounds, fp32 inside.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, D, eps, stride_x, stride_r, stride_o,
                    ADD: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[row] = w * normalize(x[row] (+ res[row], stored back into res when ADD))."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if ADD:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(r.dtype)
        tl.store(res_ptr + row * stride_r + offs, x, mask=mask)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / D + eps)
    normed = (xf * inv).to(x.dtype)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    out = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rotary_kernel(x_ptr, pos_ptr, cos_ptr, sin_ptr, num_heads, stride_t, stride_h, stride_c,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """x[t, h] rotated in place by position pos[t] (rotate-half form) for BLOCK_H heads."""
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs = tl.arange(0, HALF)
    pos = tl.load(pos_ptr + t)
    cos = tl.load(cos_ptr + pos * stride_c + offs)[None, :]
    sin = tl.load(sin_ptr + pos * stride_c + offs)[None, :]
    mask = (heads < num_heads)[:, None]
    ptrs = x_ptr + t * stride_t + heads[:, None] * stride_h + offs[None, :]
    x1 = tl.load(ptrs, mask=mask, other=0.0)
    x2 = tl.load(ptrs + HALF, mask=mask, other=0.0)
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(ptrs, (f1 * cos - f2 * sin).to(x1.dtype), mask=mask)
    tl.store(ptrs + HALF, (f2 * cos + f1 * sin).to(x1.dtype), mask=mask)


@triton.jit
def silu_and_mul_kernel(gate_ptr, up_ptr, out_ptr, N, stride_g, stride_u, stride_o,
                        BLOCK_N: tl.constexpr):
    """out[row, n-block] = silu(gate) * up, fp32 inside."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = offs < N
    g = tl.load(gate_ptr + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * stride_u + offs, mask=mask, other=0.0).to(tl.float32)
    out = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + row * stride_o + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
