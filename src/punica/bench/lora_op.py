"""Benchmark of the LoRA op at Punica's shape: ours (eager, CUDA graph) vs loop vs gather-BMM.

    python -m punica.bench.lora_op [--out-dir benchmarks/results] [--quick] [--sweep]

x[bs, 4096] . A[4096, r] . B[r, 11008], fp16, the four mixes; each figure beside its floor (bytes
that must move / device-to-device copy bandwidth measured in the same run). Beside the default
launches, the pair forced onto the tile kernels (`ours_graph_tile_us`) and, up to
ROW_KERNEL_MAX_TOKENS rows, onto the row kernels (`ours_graph_row_us`), so each row shows what the
row / tile dispatch of `lora_config.use_row_kernels` chose against. Mixed-rank rows (rank_mix
"mixed": adapters of ranks 8-64 in a pool of max rank 64, each run at its own rank) beside the same
batch "padded" (every slot run at rank 64, as a server that pads to max_lora_rank does), both over
the floor of the adapters' own ranks. Writes lora_op.json and lora_op.png to --out-dir;
`python -m punica.bench.report` renders the table into RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from punica.bench import lora_cases as lc
from punica.bench.timing import copy_bandwidth_TBps, eager_us, graph_us, run_info
from punica.ops import lora, lora_ref
from punica.ops.lora_config import (
    ROW_KERNEL_MAX_TOKENS,
    row_expand_config,
    row_shrink_config,
    tile_expand_config,
    tile_shrink_config,
)

IN_F, OUT_F = 4096, 11008
BATCH_SIZES = (1, 8, 16, 32, 64, 128)
MIX_NAMES = ("distinct", "uniform", "skewed", "identical")
MIXED_RANK_MIXES = ("distinct", "uniform", "skewed")  # several adapters, so several ranks
MIXED_RANK_SIZES = (16, 64)
MAX_RANK = max(lc.RANK_CHOICES)


def all_cases(quick: bool) -> list[lc.Case]:
    """The rows of a run: the four mixes at rank 16 over the batch sizes (bs 1 and 64 with
    `quick`), ranks 8 / 32 / 64 at bs 64, and the mixed-rank rows, each beside its padded twin
    (distinct at bs 64 only with `quick`)."""
    sizes = (1, 64) if quick else BATCH_SIZES
    cases = [lc.Case(mix, bs, 16) for mix in MIX_NAMES for bs in sizes]
    cases += [lc.Case(mix, 64, r) for r in (8, 32, 64) for mix in MIX_NAMES]
    mixed = ((("distinct", 64),) if quick
             else [(mix, bs) for bs in MIXED_RANK_SIZES for mix in MIXED_RANK_MIXES])
    cases += [lc.Case(mix, bs, MAX_RANK, rank_mix) for mix, bs in mixed
              for rank_mix in ("mixed", "padded")]
    return cases


def check(b: lc.Bench) -> float:
    """Relative error of our output vs the torch reference on call 0 (fresh random inputs). A
    mixed-rank case runs it with NaN in the pool rows past each slot's own rank (put back to zero
    after): a finite error shows the kernels never read them."""
    poison = b.case.rank_mix == "mixed"
    if poison:
        b.fill_padding(float("nan"))
    c = b.calls[0]
    y0 = c.y.clone()
    ref = y0.clone()
    try:
        lora_ref.add_lora_ref(ref, c.x, b.A, b.B, c.indptr, c.slots, b.ranks, b.scales)
        lc.ours(b, c)
        err = ((c.y.float() - ref.float()).norm() / ref.float().norm()).item()
    finally:
        c.y.copy_(y0)
        if poison:
            b.fill_padding(0.0)
    return err


def measure(case: lc.Case, copy_tbps: float, l2_bytes: int, in_f: int = IN_F,
            out_f: int = OUT_F, device: str = "cuda") -> dict[str, object]:
    """One row of lora_op.json: our op (default launches, eager and CUDA graph; the pair forced
    onto the tile kernels, and onto the row kernels up to ROW_KERNEL_MAX_TOKENS rows), the
    peers and the floor, at x[bs, in_f] . A . B[r, out_f] fp16. A mixed-rank or padded case's
    row adds rank_mix, own_ranks (the distinct own ranks) and rank_sum (a call's adapters' own
    ranks summed, what floor_us counts); its rank is the pool's max rank."""
    b = lc.build(case, in_f, out_f, torch.float16, l2_bytes, device=device)
    first = b.calls[0]
    row: dict[str, object] = {"mix": case.mix, "bs": case.bs, "rank": case.rank,
                              "adapters": b.num_adapters, "rotations": len(b.calls)}
    if case.rank_mix:
        row |= {"rank_mix": case.rank_mix, "own_ranks": sorted(set(b.call_ranks)),
                "rank_sum": sum(b.call_ranks)}
    row["rel_err"] = check(b)
    row["ours_us"] = eager_us(lambda: lc.ours(b, first))
    row["ours_graph_us"] = graph_us([lambda c=c: lc.ours(b, c) for c in b.calls])
    row["ours_graph_reduce_us"] = graph_us([lambda c=c: lc.ours(b, c, reduce=True)
                                            for c in b.calls])
    row["ours_graph_nopdl_us"] = graph_us([lambda c=c: lc.ours(b, c, pdl=False)
                                           for c in b.calls])
    for family, shrink, expand in forced_pairs(case, b.num_adapters, in_f, out_f):
        row[f"ours_graph_{family}_us"] = graph_us([_bind(lc.ours, b, c, shrink, expand)
                                                   for c in b.calls])
    row["loop_us"] = eager_us(lambda: lc.loop(b, first))
    row["gather_bmm_us"] = eager_us(lambda: lc.gather_bmm(b, first))
    row["floor_us"] = b.floor_bytes(in_f, out_f) / (copy_tbps * 1e12) * 1e6
    return row


def forced_pairs(case: lc.Case, num_segments: int, in_f: int, out_f: int,
                 ) -> list[tuple[str, lora.ShrinkConfig, lora.ExpandConfig]]:
    """(family, shrink, expand) of the pair forced onto the tile kernels and, for batches of up
    to ROW_KERNEL_MAX_TOKENS rows, onto the row kernels, whatever the default picks; the expand
    launched right after its shrink (PDL where supported), as add_lora does."""
    bs, rank = case.bs, case.rank
    pairs = [("tile", tile_shrink_config(bs, num_segments, in_f, rank),
              tile_expand_config(bs, num_segments, out_f, rank))]
    if bs <= ROW_KERNEL_MAX_TOKENS:
        pairs.append(("row", row_shrink_config(bs, num_segments, in_f, rank),
                      row_expand_config(bs, num_segments, rank)))
    return [(f, s, dataclasses.replace(e, use_pdl=None)) for f, s, e in pairs]


def sweep(l2_bytes: int) -> list[dict[str, object]]:
    """Graph time of the shrink + expand pair over a grid of shrink and of expand configs."""
    out: list[dict[str, object]] = []
    for case in (lc.Case("distinct", 64, 16), lc.Case("distinct", 8, 16),
                 lc.Case("identical", 64, 16), lc.Case("distinct", 128, 16),
                 lc.Case("distinct", 64, 64)):
        b = lc.build(case, IN_F, OUT_F, torch.float16, l2_bytes)
        shrink0 = lora.shrink_config(case.bs, b.num_adapters, IN_F, case.rank)
        expand0 = dataclasses.replace(
            lora.expand_config(case.bs, b.num_adapters, OUT_F, case.rank), use_pdl=None)
        variants = [(dataclasses.replace(shrink0, num_splits=s, block_k=k), expand0)
                    for s in (4, 8, 16) for k in (64, 128)]
        variants += [(shrink0, dataclasses.replace(expand0, block_n=n, tiles_per_program=g))
                     for n in (64, 128, 256) for g in (1, 2, 4, 8)
                     if n * case.rank <= 16384]
        for shrink, expand in variants:
            t = graph_us([_bind(lc.ours, b, c, shrink, expand) for c in b.calls])
            out.append({"case": str(case), "shrink": str(shrink), "expand": str(expand),
                        "us": t})
    return out


def _bind(fn: Callable[..., None], *args: object) -> Callable[[], None]:
    return lambda: fn(*args)


def kernel_split(l2_bytes: int) -> list[dict[str, object]]:
    """Graph time of the default shrink alone, expand alone (no PDL) and the pair, per case."""
    out = []
    for case in (lc.Case("distinct", 1, 16), lc.Case("distinct", 64, 16),
                 lc.Case("identical", 64, 16), lc.Case("distinct", 64, 64)):
        b = lc.build(case, IN_F, OUT_F, torch.float16, l2_bytes)
        row: dict[str, object] = {"case": str(case)}
        row["shrink_us"] = graph_us([_bind(_shrink_only, b, c) for c in b.calls])
        row["expand_us"] = graph_us([_bind(_expand_only, b, c) for c in b.calls])
        row["pair_us"] = graph_us([_bind(lc.ours, b, c) for c in b.calls])
        out.append(row)
        print(row)
    return out


def _shrink_only(b: lc.Bench, c: lc.Call) -> None:
    T, R = c.x.shape[0], b.A.shape[1]
    cfg = lora.shrink_config(T, c.slots.numel(), c.x.shape[1], R)
    v = b.workspace[: cfg.num_splits * T * R].view(cfg.num_splits, T, R)
    lora.sgmv_shrink(c.x, b.A, c.indptr, c.slots, b.ranks, v, cfg)


def _expand_only(b: lc.Bench, c: lc.Call) -> None:
    T, R = c.x.shape[0], b.A.shape[1]
    splits = lora.shrink_config(T, c.slots.numel(), c.x.shape[1], R).num_splits
    v = b.workspace[: splits * T * R].view(splits, T, R)
    lora.sgmv_expand(v, b.B, c.indptr, c.slots, b.ranks, b.scales, c.y)


def _sweep_only(out_dir: Path, copy_tbps: float, l2_bytes: int, argv: list[str] | None) -> int:
    from punica.bench.calibrate import calibrate

    result = {**run_info("python -m punica.bench.lora_op " + " ".join(argv or sys.argv[1:])),
              "copy_TBps": copy_tbps, "calibration": calibrate()}
    print(result["calibration"])
    result["kernel_split"] = kernel_split(l2_bytes)
    (out_dir / "lora_op_sweep.json").write_text(json.dumps(result, indent=1))
    result["sweep"] = sweep(l2_bytes)
    (out_dir / "lora_op_sweep.json").write_text(json.dumps(result, indent=1))
    best: dict[str, tuple[float, str, str]] = {}
    for s in result["sweep"]:
        if s["case"] not in best or s["us"] < best[s["case"]][0]:
            best[s["case"]] = (s["us"], s["shrink"], s["expand"])
    for case, (us, shrink, expand) in best.items():
        print(f"{case}: best {us:.2f} us with {shrink} {expand}")
    return 0


def print_table(rows: list[dict[str, object]]) -> None:
    """The rows as a plain-text table ('—' where a row lacks a figure, e.g. the row pair past
    ROW_KERNEL_MAX_TOKENS)."""
    cols = (("mix", "mix"), ("bs", "bs"), ("rank", "rank"), ("floor_us", "floor"),
            ("ours_graph_us", "graph"), ("ours_graph_tile_us", "graph_tile"),
            ("ours_graph_row_us", "graph_row"), ("ours_graph_reduce_us", "graph_red"),
            ("ours_graph_nopdl_us", "graph_nopdl"), ("ours_us", "eager"), ("loop_us", "loop"),
            ("gather_bmm_us", "gather_bmm"), ("rel_err", "rel_err"))
    from punica.bench.report import rank_label

    print(" | ".join(f"{label:>11}" for _, label in cols))
    for r in rows:
        r = {**r, "rank": rank_label(r)}
        print(" | ".join(f"{r[c]:>11.4g}" if isinstance(r.get(c), float)
                         else f"{r.get(c, '—')!s:>11}" for c, _ in cols))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--quick", action="store_true", help="bs 1 and 64 only")
    ap.add_argument("--sweep", action="store_true", help="also sweep launch configs")
    ap.add_argument("--rank-mix-only", action="store_true",
                    help="only the mixed-rank rows and their padded twins "
                         "(written to lora_op_mixed.json)")
    ap.add_argument("--sweep-only", action="store_true",
                    help="only the config sweep, kernel split and launch calibration "
                         "(written to lora_op_sweep.json)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("lora_op: needs a CUDA device", file=sys.stderr)
        return 2
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    l2_bytes = int(getattr(props, "L2_cache_size", 60 << 20))
    copy_tbps = copy_bandwidth_TBps()
    print(f"copy bandwidth {copy_tbps:.3f} TB/s, L2 {l2_bytes >> 20} MiB")
    if args.sweep_only:
        return _sweep_only(out_dir, copy_tbps, l2_bytes, argv)
    rows = []
    cases = all_cases(args.quick)
    if args.rank_mix_only:
        cases = [c for c in cases if c.rank_mix]
    for case in cases:
        rows.append(measure(case, copy_tbps, l2_bytes))
        torch.cuda.empty_cache()
    result = {**run_info("python -m punica.bench.lora_op " + " ".join(argv or sys.argv[1:])),
              "copy_TBps": copy_tbps, "shape": {"in": IN_F, "out": OUT_F, "dtype": "float16"},
              "rows": rows}
    print_table(rows)
    if args.rank_mix_only:
        (out_dir / "lora_op_mixed.json").write_text(json.dumps(result, indent=1))
        return 0
    (out_dir / "lora_op.json").write_text(json.dumps(result, indent=1))
    from punica.bench.report import plot_lora_op

    plot_lora_op(result, out_dir / "lora_op.png")
    if args.sweep:  # written again with the sweep, so a cut-short sweep loses only itself
        result["sweep"] = sweep(l2_bytes)
        (out_dir / "lora_op.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
