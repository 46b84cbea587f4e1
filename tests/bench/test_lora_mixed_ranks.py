"""The lora_op benchmark's mixed-rank rows: adapters of ranks 8-64 in a pool of max rank 64, run at
their own ranks ("mixed") or all at 64 ("padded"), on small shapes (the CPU under Triton's
interpreter when there is no GPU). The floor counts the adapters' own ranks; the kernels never read
a slot's rows past its rank (NaN there leaves the output equal to the reference's)."""

from __future__ import annotations

import pytest
import torch

from punica.bench import lora_cases as lc
from punica.bench import lora_op
from punica.bench.report import lora_op_table, rank_label
from punica.ops import lora_ref
from tests.bench.test_lora_op_bench import _wall_us

IN_F, OUT_F = 64, 96


def _bench(rank_mix: str, mix: str = "uniform", bs: int = 16,
           device: str = "cpu") -> lc.Bench:
    torch.manual_seed(0)
    return lc.build(lc.Case(mix, bs, 64, rank_mix), IN_F, OUT_F, torch.float32, l2_bytes=1,
                    device=device, max_rotations=2)


def test_floor_counts_each_adapters_own_rank() -> None:
    for rank_mix in ("mixed", "padded"):
        b = _bench(rank_mix)
        assert b.num_adapters == 4 and sorted(b.call_ranks) == [8, 16, 32, 64]
        assert b.floor_bytes(IN_F, OUT_F) == (120 * (IN_F + OUT_F)
                                              + 16 * (IN_F + 2 * OUT_F)) * 2
    distinct = _bench("mixed", "distinct", 64)
    assert sorted(distinct.call_ranks) == [8] * 16 + [16] * 16 + [32] * 16 + [64] * 16
    assert distinct.floor_bytes(IN_F, OUT_F) == (1920 * (IN_F + OUT_F)
                                                 + 64 * (IN_F + 2 * OUT_F)) * 2


def test_mixed_slots_run_at_their_own_ranks_padded_at_the_max() -> None:
    mixed, padded = _bench("mixed"), _bench("padded")
    assert mixed.call_ranks == padded.call_ranks  # the same batch
    for c in mixed.calls:  # every rotation: the same own ranks, in segment order
        assert mixed.ranks[c.slots.long()].tolist() == mixed.call_ranks
    assert padded.ranks.tolist() == [64] * padded.A.shape[0]
    assert padded.ranks_host == [64] * padded.A.shape[0]
    pad = mixed.padding_mask()
    assert pad.sum(1).tolist() == [64 - r for r in mixed.ranks.tolist()]
    for bench in (mixed, padded):  # padding is zero, as a padding server's
        assert not bench.A[pad].any() and not bench.B[pad].any()
    with pytest.raises(ValueError, match="^rank_mix: "):
        lc.Case("distinct", 8, 64, "ragged")


def test_ours_and_loop_never_read_past_a_slots_rank(device: torch.device) -> None:
    b = _bench("mixed", device=device.type)
    c = b.calls[1]
    y0 = c.y.clone()
    ref = lora_ref.add_lora_ref(y0.clone(), c.x, b.A, b.B, c.indptr, c.slots, b.ranks, b.scales)
    lc.gather_bmm(b, c)  # pads by nature: right on zero padding
    torch.testing.assert_close(c.y, ref, rtol=1e-4, atol=1e-4)
    b.fill_padding(float("nan"))
    assert b.A.isnan().any() and b.B.isnan().any()
    for fn in (lc.ours, lc.loop):
        c.y.copy_(y0)
        fn(b, c)
        torch.testing.assert_close(c.y, ref, rtol=1e-4, atol=1e-4)
    b.fill_padding(0.0)
    padded = _bench("padded", device=device.type)
    pc = padded.calls[1]
    pc.y.copy_(y0)
    lc.ours(padded, pc)  # every slot at 64 over zero padding: the mixed batch's output
    torch.testing.assert_close(pc.y, ref, rtol=1e-4, atol=1e-4)


def test_mixed_and_padded_rows_render(monkeypatch: pytest.MonkeyPatch) -> None:
    quick = [c for c in lora_op.all_cases(quick=True) if c.rank_mix]
    assert quick == [lc.Case("distinct", 64, 64, "mixed"), lc.Case("distinct", 64, 64, "padded")]
    full = [c for c in lora_op.all_cases(quick=False) if c.rank_mix]
    assert len(full) == 12 and {c.bs for c in full} == {16, 64}
    if torch.cuda.is_available():
        pytest.skip("the rows are timed on the GPU by the benchmark itself")
    monkeypatch.setattr(lora_op, "eager_us", _wall_us)
    monkeypatch.setattr(lora_op, "graph_us", _wall_us)
    rows = [lora_op.measure(lc.Case("uniform", 4, 64, m), 1.0, 0, in_f=IN_F, out_f=OUT_F,
                            device="cpu") for m in ("mixed", "padded")]
    for r in rows:
        assert r["rank"] == 64 and r["own_ranks"] == [8, 16] and r["rank_sum"] == 24
        assert float(r["rel_err"]) < 1e-2  # the mixed row's check ran over NaN padding
    assert rows[0]["floor_us"] == rows[1]["floor_us"]
    assert [rank_label(r) for r in rows] == ["8-16", "8-16 pad64"]
    table = lora_op_table({"device": "cpu", "torch": "t", "triton": "t", "commit": "0" * 40,
                           "date": "d", "copy_TBps": 1.0, "command": "c", "rows": rows})
    assert "| uniform | 4 | 8-16 |" in table and "| uniform | 4 | 8-16 pad64 |" in table
