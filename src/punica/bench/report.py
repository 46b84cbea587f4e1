"""Render recorded benchmark JSON into benchmarks/results/RESULTS.md tables and plots.

    python -m punica.bench.report [--results benchmarks/results]

RESULTS.md keeps hand-written notes; the section between `<!-- lora_op:begin -->` and
`<!-- lora_op:end -->` is regenerated from lora_op.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BEGIN, END = "<!-- lora_op:begin -->", "<!-- lora_op:end -->"


def lora_op_table(result: dict) -> str:
    head = (f"Device {result['device']}, torch {result['torch']}, triton {result['triton']}, "
            f"commit `{result['commit'][:12]}`, {result['date']}; copy bandwidth "
            f"{result['copy_TBps']:.2f} TB/s. Command: `{result['command']}`.\n\n"
            "| mix | bs | rank | floor µs | ours (graph) µs | graph, reduce in shrink µs | "
            "graph, no PDL µs | ours (eager) µs | loop µs | gather-BMM µs | graph ÷ floor | "
            "gather-BMM ÷ ours | rel. err |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in result["rows"]:
        lines.append(
            f"| {r['mix']} | {r['bs']} | {r['rank']} | {r['floor_us']:.1f} | "
            f"{r['ours_graph_us']:.1f} | {_opt(r, 'ours_graph_reduce_us')} | "
            f"{r['ours_graph_nopdl_us']:.1f} | {r['ours_us']:.0f} | "
            f"{r['loop_us']:.0f} | "
            f"{r['gather_bmm_us']:.0f} | {r['ours_graph_us'] / r['floor_us']:.2f} | "
            f"{r['gather_bmm_us'] / r['ours_graph_us']:.1f}× | {r['rel_err']:.1e} |")
    return head + "\n".join(lines) + "\n"


def _opt(row: dict, key: str) -> str:
    """A figure the run may predate: '—' when absent."""
    return f"{row[key]:.1f}" if key in row else "—"


def update_results_md(results_dir: Path) -> None:
    result = json.loads((results_dir / "lora_op.json").read_text())
    md_path = results_dir / "RESULTS.md"
    text = md_path.read_text() if md_path.exists() else f"# Benchmark results\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    before, rest = text.split(BEGIN, 1)
    _, after = rest.split(END, 1)
    md_path.write_text(f"{before}{BEGIN}\n{lora_op_table(result)}{END}{after}")


def plot_lora_op(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mixes = ("distinct", "uniform", "skewed", "identical")
    fig, axes = plt.subplots(1, 4, figsize=(16, 4), sharey=True)
    for ax, mix in zip(axes, mixes, strict=True):
        rows = sorted((r for r in result["rows"] if r["mix"] == mix and r["rank"] == 16),
                      key=lambda r: r["bs"])
        bs = [r["bs"] for r in rows]
        for key, label in (("ours_graph_us", "ours (CUDA graph)"), ("ours_us", "ours (eager)"),
                           ("gather_bmm_us", "gather-BMM"), ("loop_us", "loop"),
                           ("floor_us", "floor")):
            ax.plot(bs, [r[key] for r in rows], marker="o", label=label,
                    linestyle="--" if key == "floor_us" else "-")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{mix}, rank 16")
        ax.set_xlabel("batch size")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("µs per op (4096 → r → 11008, fp16)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"SGMV LoRA op on {result['device']} (commit {result['commit'][:8]})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="benchmarks/results")
    args = ap.parse_args(argv)
    results_dir = Path(args.results)
    update_results_md(results_dir)
    result = json.loads((results_dir / "lora_op.json").read_text())
    plot_lora_op(result, results_dir / "lora_op.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
