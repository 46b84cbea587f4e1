"""The benchmark's problems and peers compute the op they are compared on."""

from __future__ import annotations

import pytest
import torch

from punica.bench import lora_cases as lc
from punica.bench.workloads import MIXES, indptr_of, segment_lengths
from punica.ops import lora_ref


@pytest.mark.parametrize("mix", ("distinct", "uniform", "skewed", "identical"))
def test_peers_and_ours_agree_with_reference(device: torch.device, mix: str) -> None:
    torch.manual_seed(0)
    b = lc.build(lc.Case(mix, 9, 16), 64, 48, torch.float32, l2_bytes=1 << 16,
                 device=device.type, max_rotations=4)
    assert len(b.calls) == 4
    used = [sorted(c.slots.tolist()) for c in b.calls]
    assert all(not set(used[0]) & set(u) for u in used[1:]), "rotations share adapters"
    c = b.calls[1]
    y0 = c.y.clone()
    ref = lora_ref.add_lora_ref(y0.clone(), c.x, b.A, b.B, c.indptr, c.slots, b.ranks, b.scales)
    no_pdl = lambda b, c: lc.ours(b, c, pdl=False)  # noqa: E731 - the "no PDL" column's call
    for fn in (lc.ours, no_pdl, lc.loop, lc.gather_bmm):
        c.y.copy_(y0)
        fn(b, c)
        torch.testing.assert_close(c.y, ref, rtol=1e-4, atol=1e-4)


def test_floor_counts_each_used_adapter_once() -> None:
    b = lc.build(lc.Case("uniform", 16, 8), 32, 24, torch.float32, 1, "cpu", 4)
    assert b.num_adapters == 4
    assert b.floor_bytes(32, 24) == (4 * 8 * (32 + 24) + 16 * (32 + 2 * 24)) * 2


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("n", (1, 2, 3, 7, 16, 33, 64, 133))
def test_segment_lengths_cover_the_batch(mix: str, n: int) -> None:
    lengths = segment_lengths(mix, n)
    assert sum(lengths) == n and min(lengths) >= 1
    assert indptr_of(lengths)[-1] == n


def test_mix_shapes() -> None:
    assert segment_lengths("distinct", 4) == [1, 1, 1, 1]
    assert segment_lengths("identical", 5) == [5]
    assert segment_lengths("uniform", 10) == [3, 3, 2, 2]
    assert segment_lengths("skewed", 20) == [7, 5, 3, 2, 1, 1, 1]
    assert segment_lengths("pair", 6) == [1, 5]
    with pytest.raises(ValueError, match="^mix: "):
        segment_lengths("zipf", 3)
