"""Recorded multi-GPU runs beside the simulator: figures read from the run files, the replay of
the same requests, the errors, and the report's scaling, consolidation and migration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from punica.cluster.replay import errors, load_run, measured, simulated
from punica.cluster.replay_report import main
from punica.cluster.step_model import StepModel

START = 1_000_000.0


def request(arrival: float, tokens: int = 400, ttft: float = 0.1, tpot: float = 0.01,
            adapter: int = 0) -> dict:
    return {"arrival": arrival, "adapter": adapter, "prompt": 20, "tokens": tokens,
            "ttft": ttft, "tpot": tpot, "e2e": ttft + tpot * (tokens - 1), "max_gap": tpot}


def write_run(path: Path, rows: list[dict], batches: list[list[int]], tok_s: float = 100.0,
              max_batch: int = 4, migrations: int = 0, stalls: tuple[float, ...] = (),
              wall: float = 10.0) -> Path:
    """A run directory as scripts/gpu_check.sh leaves it; batches[i] is sampled at second i-1
    (the first sample precedes the run and is left out)."""
    path.mkdir(parents=True)
    gpus = len(batches[0])
    serve = {"start_unix": START, "wall_s": wall, "tok_s": tok_s, "ok": len(rows),
             "command": "punica bench serve --rate 0", "commit": "abc123", "per_request": rows}
    engines = [{"engine_id": g, "running": 0, "max_batch": max_batch, "num_blocks": 512,
                "block_size": 16} for g in range(gpus)]
    status = {"engines": engines, "migrations": migrations, "migration_stalls_s": list(stalls)}
    (path / "serve.json").write_text(json.dumps(serve))
    (path / "cluster_status.json").write_text(json.dumps(status))
    lines = [json.dumps({"t": START + i - 1, "engines": [{"running": b} for b in batch]})
             for i, batch in enumerate(batches)]
    (path / "status_trace.jsonl").write_text("\n".join(lines) + "\n")
    return path


def test_measured_figures_come_from_the_run_files(tmp_path: Path) -> None:
    rows = [request(0.0, ttft=0.1, tpot=0.01), request(0.5, ttft=0.3, tpot=0.03),
            request(1.0, tokens=1, ttft=0.2, tpot=0.0)]
    batches = [[9, 9], [1, 0], [2, 0], [3, 1], [0, 0]] + [[0, 0]] * 8 + [[7, 7]]
    run = load_run(write_run(tmp_path / "r", rows, batches, migrations=3,
                             stalls=(0.2, 0.1, 0.6)))
    real = measured(run)
    assert run.gpus == 2 and run.sim_config().kv_tokens == 512 * 16
    assert real["tok_s"] == 100.0 and real["ttft_p50_s"] == pytest.approx(0.2)
    assert real["ttft_mean_s"] == pytest.approx(0.2)
    assert real["tpot_p50_s"] == pytest.approx(0.02)  # the one-token request has no TPOT
    assert real["migrations"] == 3 and real["stall_p50_s"] == 0.2 and real["stall_max_s"] == 0.6
    # samples at 0..10 s: the one before the start and the one after the end are left out
    assert [t for t, _ in real["batch_samples"]] == [float(t) for t in range(11)]
    assert real["gpus_in_use_mean"] == pytest.approx(4 / 11)
    assert real["first_use_s"] == [0.0, 2.0]


def test_simulated_replay_consolidates_the_same_requests(tmp_path: Path) -> None:
    rows = [request(0.0), request(0.0, adapter=1)]
    roomy = load_run(write_run(tmp_path / "roomy", rows, [[0, 0]], max_batch=4))
    sim = simulated(roomy, StepModel())
    assert sim["first_use_s"][1] is None  # both fit on GPU 0: GPU 1 stays idle
    assert sim["migrations"] == 0 and sim["stall_p50_s"] is None
    assert sim["tok_s"] > 0 and sim["ttft_p50_s"] > 0 and sim["tpot_p50_s"] > 0
    full = load_run(write_run(tmp_path / "full", rows, [[0, 0]], max_batch=1))
    assert all(t is not None for t in simulated(full, StepModel())["first_use_s"])


def test_errors_are_relative_to_the_measured_figure() -> None:
    real = {"tok_s": 2.0, "migrations": 0, "ttft_p50_s": None}
    sim = {"tok_s": 2.5, "migrations": 4, "ttft_p50_s": 0.1}
    out = errors(real, sim)
    assert out["tok_s"] == {"measured": 2.0, "simulated": 2.5, "error": 0.25}
    assert out["migrations"]["error"] is None and out["ttft_p50_s"]["error"] is None
    assert out["stall_p50_s"] == {"measured": None, "simulated": None, "error": None}


def test_report_scaling_consolidation_and_migration(tmp_path: Path) -> None:
    runs = tmp_path / "multigpu"
    rows = [request(0.1 * i, adapter=i % 3) for i in range(6)]
    write_run(runs / "scale1_skewed", rows, [[0], [4], [2]], tok_s=100.0)
    write_run(runs / "scale2_skewed", rows + rows, [[0, 0], [4, 4], [2, 2]], tok_s=180.0)
    write_run(runs / "ramp", rows, [[0, 0], [1, 0], [4, 0], [4, 2], [1, 1]], tok_s=50.0)
    write_run(runs / "migrate", rows, [[0, 0], [4, 2]], migrations=2, stalls=(0.3, 0.5))
    out = tmp_path / "report"
    assert main(["--runs-dir", str(runs), "--out-dir", str(out), "--calibrate-on",
                 "scale1_skewed"]) == 0
    body = json.loads((out / "multigpu.json").read_text())
    # The replay misses most of the recorded 10 ms per token; calibrated on that run, it does not.
    assert body["errors"]["scale1_skewed"]["tpot_p50_s"] < -0.3
    cal = body["calibrated"]
    assert cal["step_model"]["c0"] > body["step_model"]["c0"] + 4e-3
    assert abs(cal["errors"]["scale1_skewed"]["tpot_p50_s"]) < 0.05
    with pytest.raises(SystemExit, match="no run 'nope'"):
        main(["--runs-dir", str(runs), "--out-dir", str(out), "--calibrate-on", "nope"])
    skewed = body["scaling"]["skewed"]
    assert skewed["gpus"] == [1, 2] and skewed["tok_s"] == [100.0, 180.0]
    assert skewed["ideal_tok_s"] == [100.0, 200.0] and skewed["efficiency"] == [1.0, 0.9]
    assert len(skewed["sim_efficiency"]) == 2 and skewed["sim_efficiency"][0] == 1.0
    taken = body["consolidation"]["measured"]
    assert [t["first_use_s"] for t in taken] == [0.0, 2.0]
    assert taken[1]["other_batches_before"] == [4]  # GPU 1 was taken when GPU 0 was full
    mig = body["migration"]["measured"]
    assert mig["migrations"] == 2 and mig["stall_p50_s"] == pytest.approx(0.4)
    assert mig["added_latency_p50_s"] == pytest.approx(0.4 - 0.01)
    assert body["runs"]["ramp"]["commit"] == "abc123"
    assert set(body["runs"]) == {"scale1_skewed", "scale2_skewed", "ramp", "migrate"}
    assert (out / "multigpu.png").stat().st_size > 0
