"""Render recorded benchmark JSON into benchmarks/results/RESULTS.md tables and plots.

    python -m punica.bench.report [--results benchmarks/results]

RESULTS.md keeps hand-written notes; the sections between `<!-- NAME:begin -->` and
`<!-- NAME:end -->` are regenerated from NAME.json (lora_op, decode, textgen) when that file exists.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rank_label(row: dict) -> str:
    """A lora_op row's rank: its rank, "8-64" for a mixed-rank row (adapters at their own ranks)
    and "8-64 pad64" for its padded twin (the same adapters, every slot run at the max rank)."""
    mix = row.get("rank_mix")
    if not mix:
        return str(row["rank"])
    own = row["own_ranks"]
    span = f"{min(own)}-{max(own)}" if len(own) > 1 else str(own[0])
    return span if mix == "mixed" else f"{span} pad{row['rank']}"


def lora_op_table(result: dict) -> str:
    """The lora_op.json rows as a markdown table; figures a run predates read '—'. Mixed-rank
    rows and their padded twins (see `rank_label`) are timed against the floor of the adapters'
    own ranks, so a padded row's "graph ÷ floor" shows what padding costs."""
    head = (f"Device {result['device']}, torch {result['torch']}, triton {result['triton']}, "
            f"commit `{result['commit'][:12]}`, {result['date']}; copy bandwidth "
            f"{result['copy_TBps']:.2f} TB/s. Command: `{result['command']}`.\n\n"
            "| mix | bs | rank | floor µs | ours (graph) µs | graph, tile kernels µs | "
            "graph, row kernels µs | graph, reduce in shrink µs | "
            "graph, no PDL µs | ours (eager) µs | loop µs | gather-BMM µs | graph ÷ floor | "
            "gather-BMM ÷ ours | rel. err |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in result["rows"]:
        lines.append(
            f"| {r['mix']} | {r['bs']} | {rank_label(r)} | {r['floor_us']:.1f} | "
            f"{r['ours_graph_us']:.1f} | {_opt(r, 'ours_graph_tile_us')} | "
            f"{_opt(r, 'ours_graph_row_us')} | {_opt(r, 'ours_graph_reduce_us')} | "
            f"{r['ours_graph_nopdl_us']:.1f} | {r['ours_us']:.0f} | "
            f"{r['loop_us']:.0f} | "
            f"{r['gather_bmm_us']:.0f} | {r['ours_graph_us'] / r['floor_us']:.2f} | "
            f"{r['gather_bmm_us'] / r['ours_graph_us']:.1f}× | {r['rel_err']:.1e} |")
    return head + "\n".join(lines) + "\n"


def _opt(row: dict, key: str) -> str:
    """A figure the run may predate: '—' when absent."""
    return f"{row[key]:.1f}" if key in row else "—"


def decode_table(result: dict) -> str:
    head = (f"Device {result['device']}, torch {result['torch']}, triton {result['triton']}, "
            f"commit `{result['commit'][:12]}`, {result['date']}; copy bandwidth "
            f"{result['copy_GBps'] / 1e3:.2f} TB/s, fp16 matmul {result['matmul_TFLOPs']:.0f} "
            f"TFLOP/s. Command: `{result['command']}`.\n\n"
            "| kind | mix | batch | context | step ms | tok/s | floor tok/s | % of floor | "
            "step ms, shrink after GEMM | step ms, unsplit attention |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['kind']} | {r['mix']} | {r['batch']} | {r['context']} | "
                         f"skipped: {r['skipped']} | | | | | |")
            continue
        after, unsplit = r.get("step_ms_shrink_after"), r.get("step_ms_unsplit")
        lines.append(f"| {r['kind']} | {r['mix']} | {r['batch']} | {r['context']} | "
                     f"{r['step_ms']:.2f} | {r['tok_s']:.0f} | {r['floor_tok_s']:.0f} | "
                     f"{100 * r['tok_s'] / r['floor_tok_s']:.0f}% | "
                     f"{'—' if after is None else f'{after:.2f}'} | "
                     f"{'—' if unsplit is None else f'{unsplit:.2f}'} |")
    return head + "\n".join(lines) + "\n"


def textgen_table(result: dict) -> str:
    head = (f"Device {result['device']}, torch {result['torch']}, commit "
            f"`{result['commit'][:12]}`, {result['date']}; {result['num_requests']} requests, "
            f"maxlen {result['maxlen']}. Command: `{result['command']}`.\n\n"
            "| engine | mix | cap | tok/s | output tok/s | wall s | floor tok/s | % of floor | "
            "ms per step: schedule / forward / sample+wait / finish | steps (eager) | "
            "untimed rehearsal s |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in result["rows"]:
        s = r.get("step_stats")
        steps = (f"{s['schedule_ms']:.2f} / {s['forward_ms']:.2f} / {s['sample_ms']:.2f} / "
                 f"{s['finish_ms']:.2f}" if s else "—")
        count = f"{s['steps']} ({s['eager_steps']})" if s else "—"
        floor = f"{r['floor_tok_s']:.0f}" if "floor_tok_s" in r else "—"
        share = f"{100 * r['tok_s'] / r['floor_tok_s']:.0f}%" if "floor_tok_s" in r else "—"
        cap = "none" if r["cap"] == 0 else r["cap"]
        rehearsal = f"{r['rehearsal_s']:.1f}" if r.get("rehearsal_s") is not None else "—"
        lines.append(f"| {r['engine']} | {r['mix']} | {cap} | {r['tok_s']:.0f} | "
                     f"{r['output_tok_s']:.0f} | {r['wall_s']:.1f} | {floor} | {share} | "
                     f"{steps} | {count} | {rehearsal} |")
    return head + "\n".join(lines) + "\n"


def replace_section(text: str, name: str, body: str) -> str:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    before, rest = text.split(begin, 1)
    _, after = rest.split(end, 1)
    return f"{before}{begin}\n{body}{end}{after}"


def update_results_md(results_dir: Path) -> None:
    md_path = results_dir / "RESULTS.md"
    text = md_path.read_text() if md_path.exists() else "# Benchmark results\n"
    for name, render in (("lora_op", lora_op_table), ("decode", decode_table),
                         ("textgen", textgen_table)):
        path = results_dir / f"{name}.json"
        if path.exists():
            text = replace_section(text, name, render(json.loads(path.read_text())))
    md_path.write_text(text)


def _save(fig: object, path: Path, title: str) -> None:
    """Title, lay out, write and close a figure."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lora_op(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mixes = ("distinct", "uniform", "skewed", "identical")
    fig, axes = plt.subplots(1, 4, figsize=(16, 4), sharey=True)
    for ax, mix in zip(axes, mixes, strict=True):
        rows = sorted((r for r in result["rows"]
                       if r["mix"] == mix and r["rank"] == 16 and not r.get("rank_mix")),
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
    _save(fig, path, f"SGMV LoRA op on {result['device']} (commit {result['commit'][:8]})")


def plot_decode(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["kind"] == "decode" and "skipped" not in r]
    contexts = sorted({r["context"] for r in rows})
    fig, axes = plt.subplots(1, len(contexts), figsize=(6 * len(contexts), 4.5), squeeze=False)
    for ax, ctx in zip(axes[0], contexts, strict=True):
        for mix in ("distinct", "uniform", "skewed", "identical", "none"):
            pts = sorted((r["batch"], r["tok_s"], r["floor_tok_s"]) for r in rows
                         if r["mix"] == mix and r["context"] == ctx)
            if not pts:
                continue
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mix)
            if mix in ("distinct", "none"):
                ax.plot([p[0] for p in pts], [p[2] for p in pts], linestyle="--",
                        color=line.get_color(), label=f"{mix} floor")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"decode, context {ctx}")
        ax.set_xlabel("batch size")
        ax.set_ylabel("tokens / s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path, f"7B-shape decode steps, rank 16 on 7 projections, {result['device']} "
                     f"(commit {result['commit'][:8]})")


def textgen_bars(result: dict) -> dict[str, list[tuple[str, float, float | None]]]:
    """Per cap ("32", "none"): (mix, tok/s, floor tok/s or None) of each punica row, in the
    run's order, and the HF + PEFT rows under "hf+peft"."""
    bars: dict[str, list[tuple[str, float, float | None]]] = {}
    for r in result["rows"]:
        key = "hf+peft" if r["engine"] != "punica" else ("none" if r["cap"] == 0
                                                          else str(r["cap"]))
        bars.setdefault(key, []).append((r["mix"], r["tok_s"], r.get("floor_tok_s")))
    return bars


def plot_textgen(result: dict, path: Path) -> None:
    """Bars of tok/s per mix for each batch cap, each beside its floor, HF + PEFT beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = textgen_bars(result)
    caps = [k for k in bars if k != "hf+peft"]
    fig, axes = plt.subplots(1, len(caps), figsize=(6 * len(caps), 4.5), squeeze=False)
    hf = bars.get("hf+peft", [])
    for ax, cap in zip(axes[0], caps, strict=True):
        rows = bars[cap] + [(f"hf+peft ({m})", t, None) for m, t, _ in hf]
        xs = list(range(len(rows)))
        measured = ax.bar([x - 0.2 for x in xs], [t for _, t, _ in rows], width=0.4,
                          label="tok/s")
        ax.bar_label(measured, fmt="%.0f", fontsize=7)
        ax.bar([x + 0.2 for x in xs], [f or 0.0 for _, _, f in rows], width=0.4,
               label="floor tok/s", alpha=0.5)
        ax.set_xticks(xs, [m for m, _, _ in rows], rotation=30, ha="right")
        ax.set_title(f"batch cap {cap}")
        ax.set_ylabel("(prompt + output) tokens / s")
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, path, f"text generation, {result['num_requests']} requests, {result['device']} "
                     f"(commit {result['commit'][:8]})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="benchmarks/results")
    args = ap.parse_args(argv)
    results_dir = Path(args.results)
    update_results_md(results_dir)
    for name, plot in (("lora_op", plot_lora_op), ("decode", plot_decode),
                       ("textgen", plot_textgen)):
        path = results_dir / f"{name}.json"
        if path.exists():
            plot(json.loads(path.read_text()), results_dir / f"{name}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
