"""Probe of the SGMV row-group kernels (several rows of one segment per program) against the
default launch (diagnostics for the row-group heuristics in lora_config.py).

    python scripts/group_probe.py OUT_DIR    # prints a line per case, writes group_probe.json

Graph time per call over rotating problems (cold weights), 4096 -> 11008 fp16, rank 16, for
batches whose segments hold several rows (Uniform, Skewed, Identical): the default pair
(`default_pair_us`, the named baseline: row kernels at these batches), the default shrink and
expand alone, the row-group shrink and expand alone over a grid of launch parameters (the ones
that compile for sm_90 without spills: `python -m punica.ops.resources`), then the pairs of the
best of each.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from pathlib import Path

import torch

from punica.bench import lora_cases as lc
from punica.bench.timing import copy_bandwidth_TBps, graph_us, run_info
from punica.ops import lora

IN_F, OUT_F, RANK = 4096, 11008, 16
CASES = [lc.Case(mix, bs, RANK) for mix, bs in (
    ("identical", 64), ("uniform", 64), ("skewed", 64), ("identical", 32), ("uniform", 32),
    ("skewed", 32), ("identical", 16), ("uniform", 128), ("skewed", 128))]
# (rows, block_n, warps) of the expand without spills at rank 16, prefetching or not
EXPANDS = [(2, 256, 4), (2, 512, 4), (2, 512, 8), (2, 1024, 8), (4, 256, 4), (4, 256, 8),
           (4, 512, 4), (4, 512, 8), (4, 1024, 8), (8, 256, 4), (8, 256, 8), (8, 512, 4),
           (8, 1024, 8)]


def shrink_only(b: lc.Bench, c: lc.Call, cfg: lora.ShrinkConfig) -> None:
    T, R = c.x.shape[0], b.A.shape[1]
    v = b.workspace[: cfg.num_splits * T * R].view(cfg.num_splits, T, R)
    lora.sgmv_shrink(c.x, b.A, c.indptr, c.slots, b.ranks, v, cfg)


def expand_only(b: lc.Bench, c: lc.Call, cfg: lora.ExpandConfig, splits: int) -> None:
    T, R = c.x.shape[0], b.A.shape[1]
    v = b.workspace[: splits * T * R].view(splits, T, R)
    lora.sgmv_expand(v, b.B, c.indptr, c.slots, b.ranks, b.scales, c.y, cfg)


def timed(b: lc.Bench, fn, *args: object) -> float:  # noqa: ANN001
    return graph_us([lambda c=c: fn(b, c, *args) for c in b.calls])


def probe(case: lc.Case, copy_tbps: float) -> dict[str, object]:
    b = lc.build(case, IN_F, OUT_F, torch.float16, 60 << 20)
    S = b.calls[0].slots.numel()
    row: dict[str, object] = {"case": dataclasses.asdict(case), "segments": S}
    d_shrink = lora.shrink_config(case.bs, S, IN_F, RANK)
    d_expand = lora.expand_config(case.bs, S, OUT_F, RANK)
    row["default"] = {"shrink": dataclasses.asdict(d_shrink),
                      "expand": dataclasses.asdict(d_expand)}
    row["default_pair_us"] = timed(b, lambda b, c: lc.ours(b, c))
    row["default_shrink_us"] = timed(b, shrink_only, d_shrink)
    row["default_expand_us"] = timed(b, expand_only, d_expand, d_shrink.num_splits)
    shrinks = {}
    for rows, acc, warps, splits in itertools.product((2, 4, 8), (4096, 8192), (4, 8),
                                                      (2, 4, 8, 16)):
        cfg = lora.ShrinkConfig(block_m=rows, block_r=16, block_k=acc // (16 * rows),
                                num_splits=splits, num_warps=warps)
        shrinks[cfg] = timed(b, shrink_only, cfg)
    expands = {}
    for (rows, block_n, warps), tiles, prefetch in itertools.product(EXPANDS, (1, 2),
                                                                     (True, False)):
        cfg = lora.ExpandConfig(block_m=rows, block_n=block_n, block_r=16,
                                tiles_per_program=tiles, num_warps=warps, prefetch=prefetch)
        expands[cfg] = timed(b, expand_only, cfg, 4)
    best_s = sorted(shrinks, key=shrinks.get)[:3]
    best_e = sorted(expands, key=expands.get)[:3]
    row["shrinks"] = [(dataclasses.asdict(c), t) for c, t in sorted(shrinks.items(),
                                                                    key=lambda kv: kv[1])]
    row["expands"] = [(dataclasses.asdict(c), t) for c, t in sorted(expands.items(),
                                                                    key=lambda kv: kv[1])]
    pairs = {}
    for s, e in itertools.product(best_s + [d_shrink], best_e + [d_expand]):
        e = dataclasses.replace(e, use_pdl=None)
        pairs[(s, e)] = timed(b, lambda b, c, s=s, e=e: lc.ours(b, c, s, e))
    (s, e), t = min(pairs.items(), key=lambda kv: kv[1])
    row["group_pair_us"] = t
    row["group_pair"] = {"shrink": dataclasses.asdict(s), "expand": dataclasses.asdict(e)}
    row["pairs"] = [({"shrink": dataclasses.asdict(s), "expand": dataclasses.asdict(e)}, t)
                    for (s, e), t in sorted(pairs.items(), key=lambda kv: kv[1])]
    row["floor_us"] = b.floor_bytes(IN_F, OUT_F) / (copy_tbps * 1e12) * 1e6
    return row


def brief(cfg: dict[str, object]) -> str:
    keys = ("block_m", "block_k", "block_n", "num_splits", "tiles_per_program", "num_warps",
            "prefetch")
    return "/".join(f"{k}={cfg[k]}" for k in keys if k in cfg)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    copy_tbps = copy_bandwidth_TBps()
    rows = []
    for case in CASES:
        r = probe(case, copy_tbps)
        rows.append(r)
        print(f"{case.mix:>9} bs {case.bs:3d}: floor {r['floor_us']:.1f} default "
              f"{r['default_pair_us']:.2f} (shrink {r['default_shrink_us']:.2f}, expand "
              f"{r['default_expand_us']:.2f}) group {r['group_pair_us']:.2f} | best shrink "
              f"{r['shrinks'][0][1]:.2f} {brief(r['shrinks'][0][0])} | best expand "
              f"{r['expands'][0][1]:.2f} {brief(r['expands'][0][0])} | pair "
              f"{brief(r['group_pair']['shrink'])} + {brief(r['group_pair']['expand'])}",
              flush=True)
    info = run_info("python scripts/group_probe.py $OUT")
    (out / "group_probe.json").write_text(json.dumps({**info, "copy_TBps": copy_tbps,
                                                      "rows": rows}, indent=1))
