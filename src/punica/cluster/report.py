"""`punica simulate`: run the trace under each policy, report and plot (the paper's Figure 13).

    punica simulate [--gpus 16] [--duration 3600] [--policy punica,round-robin,least-loaded]
                    [--peak-rate 32] [--decode-json benchmarks/results/decode.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from punica.bench.timing import run_info
from punica.cluster.simulate import SimConfig, Simulator, make_trace
from punica.cluster.step_model import StepModel


def _pct(values: list[float]) -> dict[str, float]:
    if len(values) < 2:
        return {"p50": values[0], "p99": values[0]} if values else {}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": q[49], "p90": q[89], "p99": q[98]}


def summarize(sim: Simulator, trace: list, wall_s: float) -> dict:
    done = [r for r in trace if r.finish is not None]
    end = max((r.finish for r in done), default=0.0)
    in_use = [sum(1 for b in batch if b) for _, batch in sim.samples]
    return {
        "policy": sim.policy, "requests": len(trace), "completed": len(done),
        "migrations": sim.migrations, "sim_wall_s": wall_s,
        "throughput_tok_s": sum(r.prompt + r.output for r in done) / max(end, 1e-9),
        "output_tok_s": sum(r.output for r in done) / max(end, 1e-9),
        "gpus_in_use_mean": statistics.fmean(in_use) if in_use else 0.0,
        "gpus_in_use_max": max(in_use, default=0),
        "ttft_s": _pct([r.first_token - r.arrival for r in done]),
        "tpot_s": _pct([(r.finish - r.first_token) / (r.output - 1) for r in done
                        if r.output > 1]),
        "batch_samples": [[t, b] for t, b in sim.samples],
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(12, 3 * len(results)), sharex=True)
    axes = axes if len(results) > 1 else [axes]
    for ax, res in zip(axes, results, strict=True):
        samples = res["batch_samples"]
        times = [s[0] / 60 for s in samples]
        gpus = len(samples[0][1]) if samples else 0
        for g in range(gpus):
            ax.plot(times, [s[1][g] for s in samples], linewidth=0.8)
        ax.set_ylabel("batch size")
        ax.set_title(f"{res['policy']}: mean GPUs in use {res['gpus_in_use_mean']:.1f}, "
                     f"migrations {res['migrations']}")
    axes[-1].set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="punica simulate", description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", type=int, default=16)
    ap.add_argument("--duration", type=float, default=3600.0)
    ap.add_argument("--peak-rate", type=float, default=32.0)
    ap.add_argument("--policy", default="punica,round-robin,least-loaded")
    ap.add_argument("--kv-tokens", type=int, default=100_000)
    ap.add_argument("--decode-json", help="fit the step model to this decode benchmark")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default="benchmarks/results")
    args = ap.parse_args(argv)
    cfg = SimConfig(gpus=args.gpus, duration_s=args.duration, peak_rate=args.peak_rate,
                    kv_tokens=args.kv_tokens, seed=args.seed)
    model = StepModel.fit(args.decode_json) if args.decode_json else StepModel()
    results = []
    for policy in args.policy.split(","):
        trace = make_trace(cfg)
        sim = Simulator(cfg, model, policy)
        start = time.perf_counter()
        sim.run(trace)
        results.append(summarize(sim, trace, time.perf_counter() - start))
        r = results[-1]
        print(f"{policy:>13}: {r['completed']}/{r['requests']} done, GPUs in use mean "
              f"{r['gpus_in_use_mean']:.2f}, {r['output_tok_s']:.0f} output tok/s, TTFT p50 "
              f"{r['ttft_s'].get('p50', 0):.3f} s, migrations {r['migrations']}, "
              f"simulated in {r['sim_wall_s']:.1f} s", flush=True)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    body = {**run_info("punica simulate " + " ".join(argv or sys.argv[1:])),
            "config": cfg.__dict__, "step_model": model.__dict__, "results": results}
    (out / "simulate.json").write_text(json.dumps(body))
    plot(results, out / "simulate.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
