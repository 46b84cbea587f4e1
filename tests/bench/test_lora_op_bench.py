"""The lora_op benchmark's rows, end to end on small shapes on the CPU (Triton's interpreter; the
CUDA timers replaced by wall-clock ones): every column is there, the forced tile and row pairs
included, and the tables render them."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch

from punica.bench import lora_cases as lc
from punica.bench import lora_op
from punica.bench.report import lora_op_table
from punica.ops import lora_config

TIMED = ("ours_us", "ours_graph_us", "ours_graph_reduce_us", "ours_graph_nopdl_us",
         "ours_graph_tile_us", "loop_us", "gather_bmm_us", "floor_us")


def _wall_us(fns: Callable[[], object] | list[Callable[[], object]]) -> float:
    """Stand-in for eager_us / graph_us: one run of each call, wall-clock µs per call."""
    fns = fns if isinstance(fns, list) else [fns]
    start = time.perf_counter()
    for fn in fns:
        fn()
    return (time.perf_counter() - start) * 1e6 / len(fns)


@pytest.fixture
def rows(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    if not torch.cuda.is_available():
        monkeypatch.setattr(lora_op, "eager_us", _wall_us)
        monkeypatch.setattr(lora_op, "graph_us", _wall_us)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = (lc.Case("distinct", 4, 64), lc.Case("identical", lora_config.ROW_KERNEL_MAX_TOKENS
                                                  + 1, 16))
    return [lora_op.measure(c, copy_tbps=1.0, l2_bytes=0, in_f=64, out_f=48, device=device)
            for c in cases]


def test_measure_times_the_forced_tile_and_row_pairs(rows: list[dict[str, object]],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    small, large = rows
    for r in rows:
        for key in TIMED:
            assert isinstance(r[key], float) and r[key] > 0, (r["bs"], key)
        assert float(r["rel_err"]) < 1e-2
    assert isinstance(small["ours_graph_row_us"], float) and small["ours_graph_row_us"] > 0
    assert "ours_graph_row_us" not in large  # past ROW_KERNEL_MAX_TOKENS: no row pair
    lora_op.print_table(rows)
    out = capsys.readouterr().out
    assert "graph_tile" in out and "graph_row" in out and "—" in out
    table = lora_op_table({"device": "cpu", "torch": "t", "triton": "t", "commit": "0" * 40,
                           "date": "d", "copy_TBps": 1.0, "command": "c", "rows": rows})
    assert "graph, tile kernels µs" in table and "graph, row kernels µs" in table
    assert table.splitlines()[-1].count("—") == 1  # the large case's row pair


def test_forced_pairs_are_the_tile_and_row_configs() -> None:
    pairs = lora_op.forced_pairs(lc.Case("distinct", 64, 64), 64, 4096, 11008)
    assert [f for f, _, _ in pairs] == ["tile", "row"]
    (_, tile_s, tile_e), (_, row_s, row_e) = pairs
    assert tile_s == lora_config.tile_shrink_config(64, 64, 4096, 64)
    assert tile_e.block_m >= 16 and tile_e.use_pdl is None
    assert row_s.block_m == 1 and row_e.block_m == 1 and row_e.use_pdl is None
    assert [f for f, _, _ in lora_op.forced_pairs(lc.Case("distinct", 256, 16), 256, 64,
                                                  48)] == ["tile"]
