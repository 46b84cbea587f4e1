"""Adapters read in pool form (lora/staged.py): stacked projections, views, dtype, the
finiteness check, and slot fills from stacked buffers equal per-module fills."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from punica.errors import AdapterLoadError
from punica.lora.peft import AdapterWeights, load_adapter
from punica.lora.peft_writer import save_peft
from punica.lora.pool import LoraPool
from punica.models.random import random_adapter, tiny

ARCH = tiny(num_layers=3)


def _write(tmp_path: Path, name: str, weights: AdapterWeights) -> Path:
    return save_peft(weights, ARCH, tmp_path / name)


def test_projections_in_every_layer_are_stacked_and_modules_view_them(tmp_path: Path) -> None:
    w = random_adapter("w", ARCH, 4, torch.float32, seed=1, projections=("q", "down"))
    back = load_adapter("w", _write(tmp_path, "w", w), ARCH, 8, dtype=torch.float16)
    assert sorted(back.stacked) == ["down", "q"]
    assert set(back.modules) == set(w.modules)
    for (layer, proj), m in back.modules.items():
        st = back.stacked[proj]
        assert st.A.shape == (3, 4, w.modules[(layer, proj)].A.shape[1])
        assert m.A.dtype == m.B.dtype == torch.float16 and m.A.is_contiguous()
        assert m.A.data_ptr() == st.A[layer].data_ptr()
        assert m.B.T.data_ptr() == st.Bt[layer].data_ptr() and m.B.T.is_contiguous()
        assert torch.equal(m.A, w.modules[(layer, proj)].A.half())
        assert torch.equal(m.B, w.modules[(layer, proj)].B.half())


def test_a_projection_missing_from_a_layer_is_read_per_module(tmp_path: Path) -> None:
    w = random_adapter("w", ARCH, 4, torch.float32, seed=2, projections=("q", "v"))
    partial = {k: m for k, m in w.modules.items() if not (k[1] == "v" and k[0] == 1)}
    folder = _write(tmp_path, "p", dataclasses.replace(w, modules=partial))
    back = load_adapter("p", folder, ARCH, 8, dtype=torch.float32)
    assert sorted(back.stacked) == ["q"]
    for key, m in back.modules.items():
        assert m.B.T.is_contiguous() and torch.equal(m.B, partial[key].B)


@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("stacked", [True, False])
def test_a_non_finite_layer_is_named(tmp_path: Path, layer: int, stacked: bool) -> None:
    w = random_adapter("w", ARCH, 4, torch.float32, seed=3, projections=("k", "o"))
    mods = dict(w.modules)
    if not stacked:
        del mods[(1, "k")]
    bad = mods[(layer, "k")]
    big = bad.B.clone()
    big[3, 1] = 1e6  # finite in float32, infinite in float16
    mods[(layer, "k")] = dataclasses.replace(bad, B=big)
    folder = _write(tmp_path, "bad", dataclasses.replace(w, modules=mods))
    assert load_adapter("ok", folder, ARCH, 8, dtype=torch.float32).modules  # fine in fp32
    with pytest.raises(AdapterLoadError, match=rf"layer {layer} k_proj: non-finite weights "
                                               r"\(in float16\)"):
        load_adapter("bad", folder, ARCH, 8, dtype=torch.float16)


def test_a_slot_filled_from_stacked_buffers_equals_one_filled_per_module(
        tmp_path: Path) -> None:
    w = random_adapter("w", ARCH, 4, torch.float32, seed=4)  # all seven projections
    back = load_adapter("w", _write(tmp_path, "w", w), ARCH, 8, dtype=torch.float32)
    assert len(back.stacked) == 7
    pool = LoraPool(ARCH, num_slots=3, max_rank=8, max_tokens=8, dtype=torch.float32,
                    device=torch.device("cpu"))
    for g in pool.A_all:  # garbage everywhere: a fill must write every row it owns
        pool.A_all[g].normal_()
        pool.B_all[g].normal_()
    pool.load(0, back)
    pool.load(2, dataclasses.replace(back, stacked={}))
    for layer in range(ARCH.num_layers):
        for proj in ("q", "k", "v", "o", "gate", "up", "down"):
            group, i, start, width = pool.place[proj]
            a0 = pool.A[layer][group][0, i * 8: i * 8 + 4]
            b0 = pool.B[layer][group][0, :4, start:start + width]
            assert torch.equal(a0, w.modules[(layer, proj)].A)
            assert torch.equal(b0, w.modules[(layer, proj)].B.T)
            assert torch.equal(a0, pool.A[layer][group][2, i * 8: i * 8 + 4])
            assert torch.equal(b0, pool.B[layer][group][2, :4, start:start + width])
    assert torch.equal(pool.ranks[:, :, 0], pool.ranks[:, :, 2])
    assert torch.equal(pool.scales[:, :, 0], pool.scales[:, :, 2])
    assert int(pool.ranks[:, :, 0].min()) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinned_stacked_buffers_fill_a_cuda_slot(tmp_path: Path) -> None:
    w = random_adapter("w", ARCH, 4, torch.float16, seed=5)
    back = load_adapter("w", _write(tmp_path, "w", w), ARCH, 8, dtype=torch.float16, pin=True)
    assert all(st.A.is_pinned() and st.Bt.is_pinned() for st in back.stacked.values())
    pool = LoraPool(ARCH, num_slots=2, max_rank=8, max_tokens=8, dtype=torch.float16,
                    device=torch.device("cuda"))
    pool.load(1, back)
    torch.cuda.synchronize()
    for (layer, proj), m in w.modules.items():
        group, i, start, width = pool.place[proj]
        assert torch.equal(pool.A[layer][group][1, i * 8: i * 8 + 4].cpu(), m.A)
        assert torch.equal(pool.B[layer][group][1, :4, start:start + width].cpu(), m.B.T)
