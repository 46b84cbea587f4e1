"""The adapter pool's layout: one A and B per LoRA group (fused q/k/v, o, gate/up, down), each
projection of a group in its rows of A and its columns of B, ranks and scales per projection."""

from __future__ import annotations

import torch

from punica.lora.pool import LoraPool
from punica.models.random import random_adapter, tiny
from punica.ops.lora import workspace_numel

R = 8


def test_groups_are_laid_out_side_by_side() -> None:
    arch = tiny()
    pool = LoraPool(arch, num_slots=3, max_rank=R, max_tokens=4, dtype=torch.float32,
                    device=torch.device("cpu"))
    qv = random_adapter("qv", arch, 4, torch.float32, seed=1, projections=("q", "v", "up"))
    pool.load(2, qv)
    q_out, k_out, v_out = (arch.proj_shape(p)[1] for p in ("q", "k", "v"))

    A, B, ranks, scales, slices = pool.args(1, "qkv")
    assert slices == (q_out, k_out, v_out)
    assert A.shape == (3, 3 * R, arch.hidden_size) and B.shape == (3, R, q_out + k_out + v_out)
    assert ranks.shape == (3, 3) and ranks[:, 2].tolist() == [4, 0, 4]
    assert scales[:, 2].tolist() == [2.0, 0.0, 2.0] and ranks[:, :2].eq(0).all()
    q, v = qv.modules[(1, "q")], qv.modules[(1, "v")]
    assert torch.equal(A[2, :4], q.A) and torch.equal(A[2, 2 * R:2 * R + 4], v.A)
    assert torch.equal(B[2, :4, :q_out], q.B.T)
    assert torch.equal(B[2, :4, q_out + k_out:], v.B.T)
    assert A[2, R:2 * R].eq(0).all() and B[2, :, q_out:q_out + k_out].eq(0).all()

    A, B, ranks, scales, slices = pool.args(0, "gate_up")
    assert slices == (arch.intermediate_size,) * 2 and ranks[:, 2].tolist() == [0, 4]
    assert torch.equal(B[2, :4, arch.intermediate_size:], qv.modules[(0, "up")].B.T)

    A, B, ranks, scales, slices = pool.args(0, "down")
    assert slices == () and ranks.shape == (3,) and ranks.tolist() == [0, 0, 0]
    assert A.shape == (3, R, arch.intermediate_size) and B.shape == (3, R, arch.hidden_size)


def test_reloading_a_slot_replaces_every_projection() -> None:
    arch = tiny()
    pool = LoraPool(arch, num_slots=2, max_rank=R, max_tokens=4, dtype=torch.float32,
                    device=torch.device("cpu"))
    pool.load(0, random_adapter("all", arch, R, torch.float32, seed=2))
    assert pool.ranks[:, :, 0].eq(R).all()
    only_o = random_adapter("o", arch, 2, torch.float32, seed=3, projections=("o",))
    pool.load(0, only_o)
    o = pool.layout.index["o"]
    assert pool.ranks[:, o, 0].eq(2).all()
    others = [p for p in range(len(pool.layout.projections)) if p != o]
    assert pool.ranks[:, others, 0].eq(0).all() and pool.scales[:, others, 0].eq(0).all()
    A, _, _, _, _ = pool.args(0, "o")
    assert torch.equal(A[0, :2], only_o.modules[(0, "o")].A)


def test_workspace_fits_the_widest_group() -> None:
    pool = LoraPool(tiny(), num_slots=2, max_rank=R, max_tokens=16, dtype=torch.float32,
                    device=torch.device("cpu"))
    assert pool.workspace.numel() == workspace_numel(16, R, 3)
