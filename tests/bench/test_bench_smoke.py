"""The step benchmarks run end to end on a tiny random model on the CPU and write their JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from punica.bench import report
from punica.bench.rig import mix_slots
from punica.cli import main


def test_decode_bench_smoke(tmp_path: Path) -> None:
    rc = main(["bench", "decode", "--arch", "tiny", "--device", "cpu", "--batches", "1,4",
               "--contexts", "16", "--mixes", "distinct,none", "--prefill-tokens", "64",
               "--reps", "2", "--kv-tokens", "64", "--out-dir", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "decode.json").read_text())
    rows = result["rows"]
    assert [(r["kind"], r["mix"], r["batch"]) for r in rows] == [
        ("decode", "distinct", 1), ("decode", "none", 1), ("decode", "distinct", 4),
        ("decode", "none", 4), ("prefill", "none", 1)]
    assert all(r["step_ms"] > 0 and r["floor_ms"] > 0 for r in rows)
    assert result["commit"] and result["command"].startswith("punica bench decode")


def test_decode_table_shows_the_baselines() -> None:
    """The shrink-after and unsplit-attention columns: figures where a row has them, '—' where
    it does not (no LoRA, or a step the engine does not split)."""
    row = dict(kind="decode", mix="distinct", batch=32, context=2048, step_ms=9.0,
               tok_s=3555.5, floor_tok_s=4000.0)
    result = dict(device="H200", torch="t", triton="tr", commit="abc", date="d",
                  copy_GBps=4000.0, matmul_TFLOPs=700.0, command="punica bench decode",
                  rows=[{**row, "step_ms_shrink_after": 9.5, "step_ms_unsplit": 9.8},
                        {**row, "mix": "none", "context": 512, "step_ms_shrink_after": None,
                         "step_ms_unsplit": None}])
    lines = report.decode_table(result).splitlines()
    assert lines[2].endswith("| step ms, shrink after GEMM | step ms, unsplit attention |")
    assert lines[4] == "| decode | distinct | 32 | 2048 | 9.00 | 3556 | 4000 | 89% | 9.50 | 9.80 |"
    assert lines[5] == "| decode | none | 32 | 512 | 9.00 | 3556 | 4000 | 89% | — | — |"


def test_textgen_plot(tmp_path: Path) -> None:
    """The textgen bars: one group per cap in the run's order, HF + PEFT apart; the plot is a
    PNG file."""
    result = dict(device="H200", commit="abcdef0123", num_requests=4, rows=[
        dict(engine="hf+peft", mix="distinct", cap=4, tok_s=20.0),
        dict(engine="punica", mix="distinct", cap=32, tok_s=2000.0, floor_tok_s=3000.0),
        dict(engine="punica", mix="no-lora", cap=32, tok_s=2500.0, floor_tok_s=3100.0),
        dict(engine="punica", mix="distinct", cap=0, tok_s=3000.0, floor_tok_s=4000.0)])
    assert report.textgen_bars(result) == {
        "hf+peft": [("distinct", 20.0, None)],
        "32": [("distinct", 2000.0, 3000.0), ("no-lora", 2500.0, 3100.0)],
        "none": [("distinct", 3000.0, 4000.0)]}
    report.plot_textgen(result, tmp_path / "textgen.png")
    assert (tmp_path / "textgen.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mix_slots() -> None:
    assert mix_slots("distinct", 3) == [0, 1, 2]
    assert mix_slots("identical", 3) == [0, 0, 0]
    assert mix_slots("none", 2) == [-1, -1]
    assert mix_slots("uniform", 4) == [0, 0, 1, 1]


def test_textgen_without_the_lora_off_baseline(tmp_path: Path) -> None:
    rc = main(["bench", "textgen", "--arch", "tiny", "--device", "cpu", "--num-requests", "3",
               "--maxlen", "32", "--mixes", "skewed", "--caps", "2", "--hf-requests", "0",
               "--no-lora-off-baseline", "--kv-cache-gb", "0.01", "--decode-split-tokens", "0",
               "--no-rehearsal",
               "--out-dir", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "textgen.json").read_text())
    rows = result["rows"]
    assert [(r["engine"], r["mix"], r["requests"]) for r in rows] == [("punica", "skewed", 3)]
    assert result["decode_split_tokens"] == 0
    assert rows[0]["rehearsal_s"] is None


def test_textgen_bench_smoke(tmp_path: Path) -> None:
    rc = main(["bench", "textgen", "--arch", "tiny", "--device", "cpu", "--num-requests", "6",
               "--maxlen", "48", "--mixes", "distinct,identical", "--caps", "3", "--max-loras",
               "2", "--hf-requests", "2", "--kv-cache-gb", "0.01", "--out-dir", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "textgen.json").read_text())["rows"]
    assert [(r["engine"], r["mix"]) for r in rows] == [
        ("hf+peft", "distinct"), ("punica", "hf-requests"), ("punica", "distinct"),
        ("punica", "identical"), ("punica", "no-lora")]
    assert [r["requests"] for r in rows] == [2, 2, 6, 6, 6]  # HF and the engine on the same 2
    assert all(r["tok_s"] > 0 for r in rows)
    assert rows[1]["vs_hf_peft"] == pytest.approx(rows[1]["tok_s"] / rows[0]["tok_s"])
    # the CPU KV pool: kv_cache_bytes rounded down to whole blocks (16 tokens x 2 layers x K/V
    # x 2 heads x 16 dims x 2 bytes = 4 KiB each)
    for r in rows[2:]:
        assert 1 - 4096 / (0.01 * 2**30) < r["kv_share_of_budget"] <= 1.0
        assert r["kv_pool_gib"] == pytest.approx(r["kv_share_of_budget"] * 0.01)
        # every step of the run is in its breakdown (eager on the CPU: no graphs to warm)
        s = r["step_stats"]
        assert s["steps"] == s["eager_steps"] > 0 and s["graph_steps"] == 0
        assert r["warmup_s"] == 0.0 and r["graphs"] == 0
        assert r["rehearsal_s"] > 0  # untimed: its steps are not in the breakdown below
        # the floor replays the synchronous schedule; the engine's async steps add at most one
        # ride-along step per request (launched before that request's last token was seen)
        assert r["replay_steps"] <= s["steps"] <= r["replay_steps"] + 6 and r["floor_tok_s"] > 0
        assert r["share_of_floor"] == pytest.approx(r["floor_s"] / r["wall_s"])


def test_workload_lengths() -> None:
    from punica.bench.workloads import adapter_of_requests, request_lengths

    lengths = request_lengths(500, 2048, seed=1)
    assert all(1 <= p <= 2046 and 1 <= o and p + o <= 2047 for p, o in lengths)
    prompts = sorted(p for p, _ in lengths)
    assert 10 <= prompts[250] <= 25  # median of -1 + 18 exp(0.8 Z) is 17
    assert adapter_of_requests("skewed", 6) == [0, 0, 1, 1, 2, 3]


def test_adapters_bench_smoke(tmp_path: Path) -> None:
    """The many-adapters bench: PEFT folders written below a root, one trace replayed against
    2 and 7 adapters named by the requests and read just in time."""
    rc = main(["bench", "adapters", "--arch", "tiny", "--device", "cpu", "--counts", "2,7",
               "--rank", "4", "--num-requests", "14", "--rate", "200", "--maxlen", "24",
               "--max-loras", "2", "--max-cpu-loras", "3", "--s2-folders", "3",
               "--out-dir", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "adapters.json").read_text())
    rows = result["rows"]
    assert [(r["setting"], r["adapters"]) for r in rows] == \
        [("s1", 2), ("s1", 7), ("s2", 2), ("s2", 7)]
    assert result["settings"] == {"s1": [4], "s2": [8, 16, 32, 64]}
    assert all(r["requests"] == 14 and r["tok_s"] > 0 for r in rows)
    assert rows[0]["vs_baseline"] == rows[2]["vs_baseline"] == 1.0
    assert rows[1]["vs_baseline"] == pytest.approx(rows[1]["tok_s"] / rows[0]["tok_s"])
    assert rows[3]["vs_baseline"] == pytest.approx(rows[3]["tok_s"] / rows[2]["tok_s"])
    # every adapter used was read at least once; with 3 host entries for up to 7, some twice
    assert all(r["disk_reads"] >= r["distinct_used"] for r in rows)
    root = tmp_path / "adapter_root"
    assert sorted(p.name for p in (root / "s1").iterdir()) == sorted(f"a{k}" for k in range(7))
    # S2: three folders of their own ranks, the other names link to them
    assert [(root / "s2" / f"a{k}").is_symlink() for k in range(7)] == [False] * 3 + [True] * 4
    assert (root / "s2" / "a5").resolve() == (root / "s2" / "a2").resolve()
    assert (tmp_path / "adapters.png").stat().st_size > 0
    # two runs of one setting each (two device calls) merge into the same table
    for s in ("s1", "s2"):
        one = {**result, "settings": {s: result["settings"][s]},
               "write_s": {s: result["write_s"][s]},
               "rows": [r for r in rows if r["setting"] == s]}
        (tmp_path / f"{s}.json").write_text(json.dumps(one))
    merged_dir = tmp_path / "merged"
    assert main(["bench", "adapters", "--merge", str(tmp_path / "s1.json"),
                 str(tmp_path / "s2.json"), "--out-dir", str(merged_dir)]) == 0
    merged = json.loads((merged_dir / "adapters.json").read_text())
    assert merged["rows"] == rows and merged["settings"] == result["settings"]
    assert len(merged["runs"]) == 2 and (merged_dir / "adapters.png").stat().st_size > 0
    (tmp_path / "s2.json").write_text(json.dumps({**one, "rate": 1.0}))
    with pytest.raises(SystemExit, match="rate differ"):
        main(["bench", "adapters", "--merge", str(tmp_path / "s1.json"),
              str(tmp_path / "s2.json"), "--out-dir", str(merged_dir)])


def test_fairness_bench_smoke(tmp_path: Path) -> None:
    """The fairness bench: a alone, then a and b under fcfs and fair, on one trace."""
    from punica.bench.fairness import trace

    rc = main(["bench", "fairness", "--arch", "tiny", "--device", "cpu", "--num-requests", "6",
               "--rate", "60", "--flood", "3", "--maxlen", "24", "--max-num-seqs", "2",
               "--kv-cache-bytes", str(4 << 20), "--out-dir", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "fairness.json").read_text())
    alone, fcfs, fair = result["rows"]
    assert [r["run"] for r in result["rows"]] == ["a alone", "fcfs", "fair"]
    reqs = trace(6, 60.0, 3.0, 24, 0)
    n_b = sum(t == "b" for _, t, _, _ in reqs)
    assert n_b > 0 and "b" not in alone and alone["a"]["requests"] == 6
    assert fcfs["b"]["requests"] == fair["b"]["requests"] == n_b
    assert alone["drift"] == 0 and fair["drift"] >= 0
    assert result["bound"] == 2 * max(p + 2 * o for _, _, p, o in reqs)
    assert set(result["meets"]) == {"a_ttft", "a_throughput", "drift", "total"}
