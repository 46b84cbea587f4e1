"""The host stage: adapter modules staged once (A as is, B transposed), least recently used
dropped past its byte budget; slot loads through it give the same pool contents."""

from __future__ import annotations

import pytest
import torch

from punica.lora.host_stage import HostStage
from punica.lora.peft import ModuleLora
from punica.lora.pool import LoraPool
from punica.models.random import random_adapter, tiny


def module(rank: int, in_f: int, out_f: int, seed: int) -> ModuleLora:
    gen = torch.Generator().manual_seed(seed)
    return ModuleLora(A=torch.randn(rank, in_f, generator=gen).half(),
                      B=torch.randn(out_f, rank, generator=gen).half(), scale=2.0)


def test_stages_each_module_once_in_slot_form() -> None:
    stage = HostStage(max_bytes=1 << 20, pin=False)
    m = module(4, 8, 6, seed=0)
    a, bt = stage.get(m, torch.float32)
    assert a.dtype == bt.dtype == torch.float32 and a.is_contiguous() and bt.is_contiguous()
    assert torch.equal(a, m.A.float()) and torch.equal(bt, m.B.T.float())
    again = stage.get(m, torch.float32)
    assert again[0] is a and again[1] is bt and len(stage) == 1
    assert stage.bytes == (4 * 8 + 4 * 6) * 4
    # another dtype restages (replacing the entry)
    a16, _ = stage.get(m, torch.float16)
    assert a16.dtype == torch.float16 and len(stage) == 1 and stage.bytes == (32 + 24) * 2


def test_least_recently_used_dropped_past_the_budget() -> None:
    per = (4 * 8 + 4 * 6) * 4  # one module's A and B^T in fp32
    stage = HostStage(max_bytes=2 * per, pin=False)
    m0, m1, m2 = (module(4, 8, 6, seed=s) for s in range(3))
    first = stage.get(m0, torch.float32)[0]
    stage.get(m1, torch.float32)
    assert stage.get(m0, torch.float32)[0] is first  # m0 now most recent
    stage.get(m2, torch.float32)  # over budget: m1 goes
    assert len(stage) == 2 and stage.bytes == 2 * per
    assert stage.get(m0, torch.float32)[0] is first
    with pytest.raises(ValueError, match="max_bytes"):
        HostStage(max_bytes=-1, pin=False)


def test_pool_loads_through_the_stage(device: torch.device) -> None:
    arch = tiny()
    pool = LoraPool(arch, num_slots=3, max_rank=8, max_tokens=4, dtype=torch.float16,
                    device=device)
    assert pool.stage.pin == (device.type == "cuda")
    base = random_adapter("base", arch, 4, seed=5)
    for slot, name in ((0, "x"), (2, "y")):  # two adapters sharing one set of modules
        pool.load(slot, random_adapter(name, arch, 4, shared=base))
    assert len(pool.stage) == len(base.modules)
    if device.type == "cuda":
        torch.cuda.synchronize()
    for layer in range(arch.num_layers):
        A, B, ranks, _, slices = pool.args(layer, "qkv")
        q_out = slices[0]
        for slot in (0, 2):
            q = base.modules[(layer, "q")]
            assert torch.equal(A[slot, :4].cpu(), q.A) and torch.equal(B[slot, :4, :q_out].cpu(),
                                                                      q.B.T)
            assert ranks[:, slot].tolist() == [4, 4, 4]
        assert ranks[:, 1].tolist() == [0, 0, 0]
