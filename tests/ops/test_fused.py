"""Fused elementwise kernels vs their torch references (interpreter on CPU, natively on a GPU)."""

from __future__ import annotations

import pytest
import torch

from punica.models.arch import ModelArch
from punica.models.random import tiny
from punica.models.rope import Rotary
from punica.ops import fused, fused_ref
from tests.ops.lora_cases import seed_of

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Kernel and reference round at the same points; what is left is fp32 summation order.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1e-2)}


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype, device: torch.device,
          scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)


@pytest.mark.parametrize("rows,dim", ((1, 64), (7, 96), (33, 256), (3, 1000)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_matches_reference(device: torch.device, dtype: torch.dtype, rows: int,
                                    dim: int) -> None:
    gen = torch.Generator().manual_seed(seed_of("norm", dtype, rows, dim))
    x = randn(gen, rows, dim, dtype=dtype, device=device, scale=3.0)
    w = randn(gen, dim, dtype=dtype, device=device)
    got = fused.rms_norm(x, w, 1e-6)
    want = fused_ref.rms_norm_ref(x.cpu(), w.cpu(), 1e-6)
    torch.testing.assert_close(got.cpu(), want, rtol=TOL[dtype][0], atol=TOL[dtype][1])


@pytest.mark.parametrize("rows,dim", ((1, 64), (5, 96), (17, 512)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_rms_norm_updates_residual(device: torch.device, dtype: torch.dtype, rows: int,
                                       dim: int) -> None:
    gen = torch.Generator().manual_seed(seed_of("addnorm", dtype, rows, dim))
    x = randn(gen, rows, dim, dtype=dtype, device=device)
    residual = randn(gen, rows, dim, dtype=dtype, device=device, scale=2.0)
    w = randn(gen, dim, dtype=dtype, device=device)
    want_res = residual.cpu().clone()
    want, _ = fused_ref.add_rms_norm_ref(x.cpu(), want_res, w.cpu(), 1e-5)
    got, got_res = fused.add_rms_norm(x, residual, w, 1e-5)
    assert got_res is residual
    # The residual sum is one rounding of an exact fp32 sum: bit-equal to torch's (except
    # bf16 in Triton's CPU interpreter, which truncates fp32 -> bf16 instead of rounding).
    if dtype != torch.bfloat16 or device.type == "cuda":
        assert torch.equal(residual.cpu(), want_res)
        rtol, atol = TOL[dtype]
    else:  # a residual 1 ulp off moves the normalised row by about as much again
        rtol, atol = 3e-2, 2e-2
    torch.testing.assert_close(residual.cpu(), want_res, rtol=rtol, atol=atol)
    torch.testing.assert_close(got.cpu(), want, rtol=rtol, atol=atol)


def qwen_like_arch() -> ModelArch:
    a = tiny()
    return ModelArch(**{**a.__dict__, "rope_theta": 1e6})


@pytest.mark.parametrize("heads,head_dim", ((4, 16), (3, 32), (12, 8)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_matches_reference(device: torch.device, dtype: torch.dtype, heads: int,
                                  head_dim: int) -> None:
    arch = ModelArch(**{**tiny().__dict__, "head_dim": head_dim})
    rot = Rotary(arch, 64, device)
    gen = torch.Generator().manual_seed(seed_of("rope", dtype, heads, head_dim))
    positions = torch.randint(0, 64, (9,), generator=gen).to(device)
    x = randn(gen, 9, heads, head_dim, dtype=dtype, device=device)
    cos, sin = rot.at(positions)
    want = fused_ref.rotary_ref(x, cos, sin).cpu()
    got = fused.rotary_(x.clone(), positions, rot.cos, rot.sin)
    torch.testing.assert_close(got.cpu(), want, rtol=TOL[dtype][0], atol=TOL[dtype][1])
    assert not torch.equal(got.cpu(), x.cpu())  # positions > 0 really rotate


def test_rotary_of_a_column_slice(device: torch.device) -> None:
    """x may be a view into a fused q|k|v row (row stride > H * D): other columns untouched."""
    arch = tiny()
    rot = Rotary(arch, 32, device)
    D = arch.head_dim
    gen = torch.Generator().manual_seed(3)
    qkv = randn(gen, 5, 6 * D, dtype=torch.float16, device=device)
    before = qkv.clone()
    positions = torch.arange(5, device=device) * 3
    k = qkv[:, 2 * D: 4 * D].view(5, 2, D)
    want = fused_ref.rotary_ref(k, *rot.at(positions)).cpu()
    fused.rotary_(k, positions, rot.cos, rot.sin)
    torch.testing.assert_close(k.cpu(), want, rtol=2e-3, atol=2e-3)
    assert torch.equal(qkv[:, :2 * D].cpu(), before[:, :2 * D].cpu())
    assert torch.equal(qkv[:, 4 * D:].cpu(), before[:, 4 * D:].cpu())


@pytest.mark.parametrize("rows,cols", ((1, 32), (6, 200), (3, 2100)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_and_mul_matches_reference(device: torch.device, dtype: torch.dtype, rows: int,
                                        cols: int) -> None:
    gen = torch.Generator().manual_seed(seed_of("silu", dtype, rows, cols))
    gate = randn(gen, rows, cols, dtype=dtype, device=device, scale=3.0)
    up = randn(gen, rows, cols, dtype=dtype, device=device)
    got = fused.silu_and_mul(gate, up)
    want = fused_ref.silu_and_mul_ref(gate.cpu(), up.cpu())
    torch.testing.assert_close(got.cpu(), want, rtol=TOL[dtype][0], atol=TOL[dtype][1])


def test_bad_arguments_are_refused(device: torch.device) -> None:
    x = torch.zeros(4, 32, device=device)
    with pytest.raises(ValueError, match=r"^weight.dtype: expected torch.float32"):
        fused.rms_norm(x, torch.ones(32, dtype=torch.float16, device=device), 1e-6)
    with pytest.raises(ValueError, match=r"^weight: expected a contiguous 1-D tensor of 32"):
        fused.rms_norm(x, torch.ones(31, device=device), 1e-6)
    with pytest.raises(ValueError, match=r"^residual.shape\[1\]: expected 32"):
        fused.add_rms_norm(x, torch.zeros(4, 16, device=device), torch.ones(32, device=device),
                           1e-6)
    with pytest.raises(ValueError, match=r"^x.stride\(1\): expected 1"):
        fused.rms_norm(x.t(), torch.ones(4, device=device), 1e-6)
    with pytest.raises(ValueError, match=r"^positions: expected an int64 tensor of shape \(4,\)"):
        fused.rotary_(x.view(4, 2, 16), torch.zeros(4, dtype=torch.int32, device=device),
                      torch.zeros(8, 16, device=device), torch.zeros(8, 16, device=device))
    with pytest.raises(ValueError, match=r"^up: expected a torch.float32 tensor of shape"):
        fused.silu_and_mul(x, torch.zeros(5, 32, device=device))
