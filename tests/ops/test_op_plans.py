"""Per-signature plans of the op wrappers: a plan is reused only for the same shapes, strides,
dtypes and devices; anything else builds (and checks) anew, and buffers are never mixed up.

Kernels run on the GPU, or on CPU under Triton's interpreter.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from punica.ops import attention as attn
from punica.ops import checks, fused, fused_ref, launch, lora
from punica.ops.launch import KernelLaunch
from tests.ops.lora_cases import REL_TOL, problem_for_mix, rel_err
from tests.ops.test_attention import TOL, make_case, reference
from tests.ops.test_lora import run_reference

T, IN, OUT, R = 12, 64, 48, 16


def test_add_lora_follows_a_new_workspace_of_the_same_shape(device: torch.device) -> None:
    """The workspace views are kept per plan for the very buffer they were cut from."""
    gen = torch.Generator().manual_seed(11)
    p = problem_for_mix(gen, device, torch.float16, "distinct", T, IN, OUT, max_rank=R)
    shrink = lora.ShrinkConfig(block_m=1, block_r=16, block_k=32, num_splits=2, reduce=True)
    _, y_ref = run_reference(p)
    outs = []
    for _ in range(2):
        workspace = torch.zeros(lora.workspace_numel(T, R), device=device)
        _, v_out, _ = lora.workspace_views(workspace, 2, T, R)
        y = p.y0.clone()
        lora.add_lora(y, p.x, p.A, p.B, p.indptr, p.slots, p.ranks, p.scales, workspace,
                      shrink=shrink)
        assert rel_err(y.cpu(), y_ref) <= REL_TOL[torch.float16]
        assert v_out.abs().sum() > 0, "the shrink wrote into another buffer"
        outs.append(v_out)
    assert torch.equal(outs[0], outs[1])


def test_add_lora_replans_for_new_strides(device: torch.device) -> None:
    """y as a column slice of a wider output (another row stride), then contiguous again."""
    gen = torch.Generator().manual_seed(12)
    p = problem_for_mix(gen, device, torch.float32, "skewed", T, IN, OUT, max_rank=R)
    workspace = torch.zeros(lora.workspace_numel(T, R), device=device)
    _, y_ref = run_reference(p)
    plans = len(lora._ADD.plans)
    for width in (OUT, OUT + 40, OUT):
        wide = torch.full((T, width), float("nan"), device=device)
        y = wide[:, :OUT]
        y.copy_(p.y0)
        lora.add_lora(y, p.x, p.A, p.B, p.indptr, p.slots, p.ranks, p.scales, workspace)
        assert rel_err(y.cpu(), y_ref) <= REL_TOL[torch.float32]
        assert torch.isnan(wide[:, OUT:]).all(), "wrote past the slice"
    assert len(lora._ADD.plans) == plans + 2


def test_bad_call_after_a_good_one_still_raises(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(13)
    p = problem_for_mix(gen, device, torch.float16, "uniform", T, IN, OUT, max_rank=R)
    workspace = torch.zeros(lora.workspace_numel(T, R), device=device)
    args = (p.x, p.A, p.B, p.indptr, p.slots, p.ranks, p.scales, workspace)
    lora.add_lora(p.y0.clone(), *args)
    for _ in range(2):
        with pytest.raises(ValueError, match=r"^B_pool.dtype: expected torch.float16"):
            lora.add_lora(p.y0.clone(), p.x, p.A, p.B.float(), *args[3:])
        with pytest.raises(ValueError, match=r"^slots: expected values in \[-1, "):
            lora.add_lora(p.y0.clone(), p.x, p.A, p.B, p.indptr, p.slots + 100, p.ranks,
                          p.scales, workspace, check_values=True)
    lora.add_lora(p.y0.clone(), *args)


def test_paged_decode_replans_for_a_strided_block_table(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(14)
    c = make_case(gen, device, torch.float32, [5, 33, 17], [1, 1, 1], 4, 2, 16, 8)
    ref = reference(c)
    tables = c["tables_t"]
    padded = torch.zeros(tables.shape[0], tables.shape[1] + 3, dtype=torch.int32, device=device)
    padded[:, : tables.shape[1]] = tables
    for table in (tables, padded[:, : tables.shape[1]], tables):
        out = torch.full_like(c["q"], float("nan"))
        attn.paged_decode(c["q"], c["k_cache"], c["v_cache"], c["seq_lens_t"], table,
                          c["scale"], out)
        assert rel_err(out.cpu(), ref) <= TOL[torch.float32]


def _launches(plan: lora.AddLoraPlan) -> list[KernelLaunch]:
    return [lp.launch for lp in (plan.shrink, plan.expand) if lp.launch is not None]


@pytest.mark.parametrize("reduce", (False, True))
@pytest.mark.parametrize("bs,mix", [(32, "distinct"), (136, "identical")])  # row, tile kernels
def test_relaunch_matches_triton_launch(device: torch.device, bs: int, mix: str, reduce: bool,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """From the second call of a signature on, CUDA launches go straight to the compiled kernel:
    same result as kernel[grid] on fresh inputs; a misaligned y takes Triton's path."""
    cuda = device.type == "cuda"
    in_f, out_f = (4096, 11008) if cuda else (64, 48)
    monkeypatch.setattr(lora._ADD, "plans", {})  # this test's plans alone
    gen = torch.Generator().manual_seed(bs + reduce)
    p = problem_for_mix(gen, device, torch.float16, mix, bs, in_f, out_f, max_rank=R)
    workspace = torch.zeros(lora.workspace_numel(bs, R), device=device)
    shrink = dataclasses.replace(lora.shrink_config(bs, p.slots.numel(), in_f, R), reduce=reduce)

    def run(y: torch.Tensor) -> torch.Tensor:
        y.copy_(p.y0)
        return lora.add_lora(y, p.x, p.A, p.B, p.indptr, p.slots, p.ranks, p.scales, workspace,
                             shrink=shrink)

    run(p.y0.clone())  # compiles; the launch keeps the kernel
    p.x.copy_(torch.randn(p.x.shape, generator=gen).to(p.x.dtype))
    _, y_ref = run_reference(p)
    fast = run(p.y0.clone())
    (plan,) = lora._ADD.plans.values()
    if cuda:
        assert all(k.is_fast(torch.cuda.current_device()) for k in _launches(plan))
    monkeypatch.setattr(launch, "FAST_LAUNCH", False)
    slow = run(p.y0.clone())
    monkeypatch.setattr(launch, "FAST_LAUNCH", True)
    assert torch.equal(fast, slow)
    assert rel_err(fast.cpu(), y_ref) <= REL_TOL[torch.float16]
    wide = torch.zeros(bs, out_f + 8, dtype=torch.float16, device=device)
    for _ in range(2):
        assert torch.equal(run(wide[:, 1: 1 + out_f]), slow)  # 2 bytes off: not 16-aligned


def test_attention_relaunch_matches_reference(device: torch.device) -> None:
    """write_kv_cache, paged_prefill and paged_decode called again with fresh inputs."""
    gen = torch.Generator().manual_seed(15)
    dtype = torch.float16
    c = make_case(gen, device, dtype, [40, 17, 64], [1, 1, 1], 8, 2, 64, 16)
    ws = attn.DecodeWorkspace.allocate(3, 8, 64, 4, device)
    for trial in range(3):
        c["q"].copy_(torch.randn(c["q"].shape, generator=gen).to(dtype))
        k, v = (torch.randn(3, 2, 64, generator=gen).to(dtype).to(device) for _ in range(2))
        last = [t[-1] * 16 + (n - 1) % 16 for t, n in zip(c["tables"], c["contexts"],
                                                          strict=True)]
        attn.write_kv_cache(k, v, c["k_cache"], c["v_cache"],
                            torch.tensor(last, dtype=torch.int64, device=device))
        ref = reference(c)
        out = torch.full_like(c["q"], float("nan"))
        attn.paged_decode(c["q"], c["k_cache"], c["v_cache"], c["seq_lens_t"], c["tables_t"],
                          c["scale"], out, max_context=64, workspace=ws)
        assert rel_err(out.cpu(), ref) <= TOL[dtype], f"decode, trial {trial}"
        out = torch.full_like(c["q"], float("nan"))
        attn.paged_prefill(c["q"], c["k_cache"], c["v_cache"], c["cu_t"], c["seq_lens_t"],
                           c["tables_t"], c["scale"], out)
        assert rel_err(out.cpu(), ref) <= TOL[dtype], f"prefill, trial {trial}"


def test_fused_plans_follow_the_interpreter_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CPU tensors the fused ops launch the (interpreted) kernel only while the kernels are
    treated as interpreted, else run the torch reference: one plan each, the same signature."""
    if not checks.interpreting():
        pytest.skip("the kernels are compiled: CPU tensors never reach them")
    monkeypatch.setattr(fused._NORM, "plans", {})
    gen = torch.Generator().manual_seed(16)
    x, w = torch.randn(3, 24, generator=gen), torch.randn(24, generator=gen)
    ref = fused_ref.rms_norm_ref(x, w, 1e-5)
    for on in (True, False, True, False):
        with checks.use_interpreter(on):
            torch.testing.assert_close(fused.rms_norm(x, w, 1e-5), ref)
    kinds = sorted(type(plan).__name__ for plan in fused._NORM.plans.values())
    assert kinds == ["KernelLaunch", "NoneType"]
