"""The adapter-latency bench end to end on a tiny random model on the CPU: cold-start TTFT per
adapter state and the warm streams' token gaps with and without cold adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from punica.bench.serve import percentiles
from punica.cli import main


def test_percentiles_interpolate_as_the_bench_reports_them() -> None:
    assert percentiles([3.0, 1.0, 2.0])["p50"] == 2.0
    assert percentiles([0.0, 10.0])["p90"] == pytest.approx(9.0)
    assert percentiles([5.0])["p99"] == 5.0


def test_adapter_latency_bench_smoke(tmp_path: Path) -> None:
    rc = main(["bench", "adapter-latency", "--arch", "tiny", "--device", "cpu",
               "--warm-streams", "2", "--cold", "3", "--repeats", "2", "--max-tokens", "4",
               "--stall-max-loras", "4", "--prompt-len", "16", "--stream-prompt-len", "16",
               "--out-dir", str(tmp_path)])
    assert rc == 0
    r = json.loads((tmp_path / "adapter_latency.json").read_text())
    assert r["commit"] and r["command"].startswith("punica bench adapter-latency")
    assert r["rank"] == 16 and r["adapter_bytes"] > 0 and r["file_bytes"] >= r["adapter_bytes"]
    # 2 * repeats cold-start adapters + max_loras fillers, then 3 cold ones (the 2 warm streams
    # reuse the first folders)
    assert len(list((tmp_path / "adapter_latency_root").iterdir())) == 2 * 2 + 4 + 3
    cs = r["cold_start"]
    assert cs["repeats"] == 2 and set(cs["states"]) == {"warm", "host", "host_unstaged", "disk"}
    for state, s in cs["states"].items():
        assert len(s["ttft_ms"]) == 2 and all(t > 0 for t in s["ttft_ms"])
        assert 0 < s["median_ms"] <= s["p90_ms"]
        if state != "warm":  # no floors on the CPU (no host-to-device copy)
            assert s["floor_ms"] is None and s["target_ms"] in (10.0, 50.0)
            assert s["extra_ms"] == pytest.approx(s["median_ms"] - cs["states"]["warm"]
                                                  ["median_ms"])
    assert cs["h2d_GBps"] is None and cs["read_GBps"] > 0
    if cs["fadvise"] and cs["page_cache_resident_after_drop"] is not None:
        assert 0.0 <= cs["page_cache_resident_after_drop"] <= 1.0
    st = r["stall"]
    assert st["warm_streams"] == 2 and st["cold"] == 3 and st["ratio"] > 0
    runs = st["runs"]
    assert set(runs) == {"alone", "with_hot", "with_cold"}
    for run in runs.values():
        assert run["warm_tokens"] == 2 * 4 and run["gaps"] == 2 * 3
        assert 0 < run["p50_gap_ms"] <= run["p99_gap_ms"] <= run["max_gap_ms"]
    assert runs["alone"]["extra_requests"] == 0
    for key in ("with_hot", "with_cold"):
        assert runs[key]["extra_requests"] == 3 and len(runs[key]["extra_ttft_ms"]) == 3
        assert all(t > 0 for t in runs[key]["extra_ttft_ms"])
    # every cold adapter was read from disk and filled into a slot once; the warm streams kept
    # theirs
    assert runs["with_cold"]["disk_reads"] == 3 and runs["with_cold"]["slot_fills"] == 3
    assert st["ratio"] == pytest.approx(runs["with_cold"]["p99_gap_ms"] /
                                        runs["alone"]["p99_gap_ms"])
