"""Recorded cluster runs beside the simulator's replay of the same requests, figure by figure.

    python -m punica.cluster.replay --runs-dir gpu_out/multigpu \
        --decode-json benchmarks/results/decode.json --out-dir benchmarks/results/multigpu

A run directory holds what the mg_* steps of scripts/gpu_check.sh write: serve.json (bench serve:
each request's arrival, adapter, lengths and latencies), status_trace.jsonl (the cluster's status
each second) and cluster_status.json (its last status: the engines with their batch cap and KV
blocks, the migrations and the latency each one added). The simulator replays the run's own
requests (same arrivals, lengths and adapters) on as many GPUs with the same batch cap and KV
blocks, under the Punica policy, with a step model fitted to decode.json. The error of a figure
is (simulated - measured) / measured.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

from punica.cluster.simulate import SimConfig, SimRequest, Simulator, trace_of
from punica.cluster.step_model import StepModel

FIGURES = ("tok_s", "ttft_p50_s", "ttft_mean_s", "tpot_p50_s", "e2e_p50_s", "gpus_in_use_mean",
           "migrations", "stall_p50_s")
"""The figures compared per run. With all requests at once and half of them queued, the median
TTFT sits on the edge between the placed and the queued ones: the mean is the steadier figure."""


@dataclass(frozen=True)
class Run:
    name: str
    serve: dict
    status: dict
    samples: list[dict]
    """The status trace: one status per second, each with its unix time `t`."""

    @property
    def gpus(self) -> int:
        return len(self.status["engines"])

    def sim_config(self) -> SimConfig:
        e = self.status["engines"][0]
        return SimConfig(gpus=self.gpus, max_batch=e["max_batch"],
                         kv_tokens=e["num_blocks"] * e["block_size"],
                         block_size=e["block_size"], sample_every_s=1.0)


def load_run(path: Path) -> Run:
    lines = (path / "status_trace.jsonl").read_text().splitlines()
    return Run(path.name, json.loads((path / "serve.json").read_text()),
               json.loads((path / "cluster_status.json").read_text()),
               [json.loads(line) for line in lines if line.strip()])


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _first_use(samples: list[tuple[float, list[int]]], gpus: int) -> list[float | None]:
    """The first sampled time each GPU ran a request (None: never)."""
    return [next((t for t, batch in samples if batch[g]), None) for g in range(gpus)]


def _figures(tok_s: float, ttft: list[float], tpot: list[float], e2e: list[float],
             samples: list[tuple[float, list[int]]], migrations: int,
             stalls: list[float]) -> dict:
    in_use = [sum(1 for b in batch if b) for _, batch in samples]
    return {"tok_s": tok_s, "ttft_p50_s": _median(ttft),
            "ttft_mean_s": statistics.fmean(ttft) if ttft else None, "tpot_p50_s": _median(tpot),
            "e2e_p50_s": _median(e2e),
            "gpus_in_use_mean": statistics.fmean(in_use) if in_use else None,
            "migrations": migrations, "stall_p50_s": _median(stalls),
            "stall_max_s": max(stalls, default=None)}


def measured(run: Run) -> dict:
    """The run's figures, and its batch per engine each second from its start to its end."""
    serve, rows = run.serve, run.serve["per_request"]
    start, wall = serve["start_unix"], serve["wall_s"]
    samples = [(s["t"] - start, [e["running"] for e in s["engines"]]) for s in run.samples
               if 0 <= s["t"] - start <= wall]
    stalls = list(run.status.get("migration_stalls_s", []))
    figures = _figures(serve["tok_s"], [r["ttft"] for r in rows],
                       [r["tpot"] for r in rows if r["tokens"] > 1], [r["e2e"] for r in rows],
                       samples, run.status["migrations"], stalls)
    return {**figures, "first_use_s": _first_use(samples, run.gpus), "batch_samples": samples}


def simulated(run: Run, model: StepModel) -> dict:
    """The simulator's figures for the run's requests on the run's cluster."""
    trace: list[SimRequest] = trace_of(run.serve["per_request"])
    sim = Simulator(run.sim_config(), model, "punica")
    sim.run(trace)
    end = max(r.finish for r in trace)
    samples = [(t, batch) for t, batch in sim.samples]
    figures = _figures(sum(r.prompt + r.output for r in trace) / end,
                       [r.first_token - r.arrival for r in trace],
                       [(r.finish - r.first_token) / (r.output - 1) for r in trace
                        if r.output > 1], [r.finish - r.arrival for r in trace],
                       samples, sim.migrations, sim.stalls)
    return {**figures, "first_use_s": _first_use(samples, run.gpus), "batch_samples": samples}


def calibrated(model: StepModel, run: Run) -> StepModel:
    """`model` with its fixed cost per step moved by what the replay of `run` misses of the run's
    median time per output token (the serving path's cost per step that a bare decode step in
    decode.json does not pay)."""
    gap = measured(run)["tpot_p50_s"] - simulated(run, model)["tpot_p50_s"]
    return replace(model, c0=max(model.c0 + gap, 0.0),
                   source=f"{model.source}, {gap * 1e3:+.2f} ms per step from {run.name}")


def errors(real: dict, sim: dict) -> dict[str, dict]:
    """Each figure measured, simulated and the simulator's relative error (None where the
    measured figure is 0 or missing)."""
    out = {}
    for key in FIGURES:
        m, s = real.get(key), sim.get(key)
        err = (s - m) / m if m and s is not None else None
        out[key] = {"measured": m, "simulated": s, "error": err}
    return out


if __name__ == "__main__":
    from punica.cluster.replay_report import main

    raise SystemExit(main())
