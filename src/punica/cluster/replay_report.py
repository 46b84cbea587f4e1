"""`python -m punica.cluster.replay`'s report: scaling, consolidation and migration of the
recorded multi-GPU runs beside the simulator's replay, to multigpu.json and multigpu.png.

Runs by name (scripts/gpu_check.sh, steps mg_*): scale<N>_<mix> (N engines, all requests at
once), ramp (a rising arrival rate), migrate (small KV pools).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from punica.bench.timing import run_info
from punica.cluster.replay import Run, calibrated, errors, load_run, measured, simulated
from punica.cluster.step_model import StepModel

SCALE = re.compile(r"scale(\d+)_(\w+)")


def scaling(results: dict[str, dict]) -> dict[str, dict]:
    """Per mix: throughput at each GPU count beside N x the one-GPU figure, and the simulator's."""
    out: dict[str, dict] = {}
    for name, res in sorted(results.items()):
        m = SCALE.fullmatch(name)
        if m:
            row = out.setdefault(m.group(2), {"gpus": [], "tok_s": [], "sim_tok_s": []})
            row["gpus"].append(int(m.group(1)))
            row["tok_s"].append(res["measured"]["tok_s"])
            row["sim_tok_s"].append(res["simulated"]["tok_s"])
    for row in out.values():
        order = sorted(range(len(row["gpus"])), key=row["gpus"].__getitem__)
        for key in ("gpus", "tok_s", "sim_tok_s"):
            row[key] = [row[key][i] for i in order]
        if row["gpus"][0] == 1:
            one, sim_one = row["tok_s"][0], row["sim_tok_s"][0]
            row["ideal_tok_s"] = [n * one for n in row["gpus"]]
            row["efficiency"] = [t / (n * one) for n, t in zip(row["gpus"], row["tok_s"],
                                                               strict=True)]
            row["sim_efficiency"] = [t / (n * sim_one) for n, t in
                                     zip(row["gpus"], row["sim_tok_s"], strict=True)]
    return out


def _taken(res: dict, run: Run) -> dict:
    """When each GPU first ran a request, the arrival rate then (requests in the 20 s before)
    and the other GPUs' batches at that moment."""
    arrivals = [r["arrival"] for r in run.serve["per_request"]]
    samples = res["batch_samples"]
    out = []
    for g, t in enumerate(res["first_use_s"]):
        if t is None:
            out.append({"gpu": g, "first_use_s": None})
            continue
        batch = next(b for s, b in samples if s == t)
        before = [s for s in samples if s[0] < t]
        prev = before[-1][1] if before else [0] * len(batch)
        out.append({"gpu": g, "first_use_s": t,
                    "rate_req_s": sum(1 for a in arrivals if t - 20 <= a <= t) / min(20, t or 1),
                    "other_batches_before": [b for i, b in enumerate(prev) if i != g]})
    return out


def consolidation(run: Run, res: dict) -> dict:
    return {"max_batch": run.sim_config().max_batch,
            "measured": _taken(res["measured"], run), "simulated": _taken(res["simulated"], run)}


def migration(res: dict) -> dict:
    out = {}
    for side in ("measured", "simulated"):
        f = res[side]
        stall, tpot = f["stall_p50_s"], f["tpot_p50_s"]
        out[side] = {"migrations": f["migrations"], "stall_p50_s": stall,
                     "stall_max_s": f["stall_max_s"], "tpot_p50_s": tpot,
                     "added_latency_p50_s": stall - tpot if stall is not None else None}
    return out


def plot(results: dict[str, dict], scale: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timelines = [n for n in ("ramp", "migrate") if n in results]
    fig, axes = plt.subplots(1, 1 + len(timelines), figsize=(6 * (1 + len(timelines)), 4.5))
    axes = list(axes) if timelines else [axes]
    ax = axes[0]
    for k, (mix, row) in enumerate(sorted(scale.items())):
        ax.plot(row["gpus"], row["tok_s"], "o-", color=f"C{k}", label=f"{mix} measured")
        ax.plot(row["gpus"], row["sim_tok_s"], "x--", color=f"C{k}", label=f"{mix} simulated")
        if "ideal_tok_s" in row:
            ax.plot(row["gpus"], row["ideal_tok_s"], ":", color=f"C{k}", label=f"{mix} N x 1 GPU")
    ax.set_xlabel("GPUs (one engine each)")
    ax.set_ylabel("tok/s (prompt + output)")
    ax.set_title("throughput scaling")
    ax.legend(fontsize=7)
    for ax, name in zip(axes[1:], timelines, strict=True):
        res = results[name]
        for side, style in (("measured", "-"), ("simulated", "--")):
            samples = res[side]["batch_samples"]
            for g in range(len(samples[0][1]) if samples else 0):
                ax.plot([s[0] for s in samples], [s[1][g] for s in samples], style,
                        color=f"C{g}", label=f"GPU {g} {side}")
        m = res["measured"]
        ax.set_title(f"{name}: migrations {m['migrations']} (sim "
                     f"{res['simulated']['migrations']})")
        ax.set_xlabel("seconds")
        ax.set_ylabel("running requests")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def replay_all(runs: list[Run], model: StepModel) -> dict[str, dict]:
    """Each run measured, replayed under `model`, and the simulator's error per figure."""
    results = {}
    for run in runs:
        real, sim = measured(run), simulated(run, model)
        results[run.name] = {"gpus": run.gpus, "config": run.sim_config().__dict__,
                             "commit": run.serve.get("commit"), "command": run.serve["command"],
                             "requests": run.serve["ok"], "figures": errors(real, sim),
                             "measured": real, "simulated": sim}
    return results


def summarize(runs: list[Run], results: dict[str, dict], model: StepModel) -> dict:
    ramp = next((r for r in runs if r.name == "ramp"), None)
    return {"step_model": model.__dict__, "scaling": scaling(results),
            "consolidation": consolidation(ramp, results["ramp"]) if ramp else None,
            "migration": migration(results["migrate"]) if "migrate" in results else None,
            "errors": {name: {k: v["error"] for k, v in res["figures"].items()}
                       for name, res in results.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m punica.cluster.replay",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--runs-dir", required=True, help="the run directories (gpu_out/multigpu)")
    ap.add_argument("--decode-json", help="fit the step model to this decode benchmark")
    ap.add_argument("--calibrate-on", metavar="RUN", help="also replay with the step model "
                    "calibrated to this run's time per output token")
    ap.add_argument("--out-dir", default="benchmarks/results/multigpu")
    args = ap.parse_args(argv)
    model = StepModel.fit(args.decode_json) if args.decode_json else StepModel()
    runs = [load_run(p) for p in sorted(Path(args.runs_dir).iterdir())
            if (p / "cluster_status.json").exists()]
    if not runs:
        raise SystemExit(f"{args.runs_dir}: no run directories (with cluster_status.json)")
    results = replay_all(runs, model)
    body = {**run_info("python -m punica.cluster.replay " + " ".join(argv or sys.argv[1:])),
            **summarize(runs, results, model), "calibrated": None}
    if args.calibrate_on:
        by_name = {r.name: r for r in runs}
        if args.calibrate_on not in by_name:
            raise SystemExit(f"--calibrate-on: no run {args.calibrate_on!r} in {sorted(by_name)}")
        cal = calibrated(model, by_name[args.calibrate_on])
        body["calibrated"] = summarize(runs, replay_all(runs, cal), cal)
    body["runs"] = results
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "multigpu.json").write_text(json.dumps(body, indent=1))
    plot(results, body["scaling"], out / "multigpu.png")
    for name, errs in body["errors"].items():
        cal = body["calibrated"]["errors"][name] if body["calibrated"] else {}
        print(f"{name:>16}: " + ", ".join(
            f"{k} {v:+.0%}" + (f" ({cal[k]:+.0%})" if cal.get(k) is not None else "")
            for k, v in errs.items() if v is not None), flush=True)
    return 0
