"""The slices benchmark's two paths (one sliced add_lora, one call per projection) agree, on
small shapes (Triton's interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

from punica.bench.lora_slices import agreement, build, floor_bytes


@pytest.mark.parametrize("mix", ("distinct", "identical"))
def test_sliced_and_per_projection_calls_agree(mix: str) -> None:
    b = build(mix, 5, 4, 32, (16, 8, 8), torch.float32, torch.device("cpu"), l2_bytes=0)
    assert len(b.x) == 2 and b.A.shape == (2 * b.slots[0].numel(), 12, 32)
    assert agreement(b) < 1e-5
    adapters = 5 if mix == "distinct" else 1
    assert floor_bytes(b, 5, 32) == (adapters * 4 * (3 * 32 + 32) + 5 * (32 + 64)) * 2
