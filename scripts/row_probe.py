"""Probe of the SGMV row kernels against the tile kernels (diagnostics for tuning the heuristics).

    python scripts/row_probe.py OUT_DIR      # prints a table, writes OUT_DIR/row_probe.json

Graph time per call over rotating problems (cold weights), 4096 -> 11008 fp16: the shrink alone
and the expand alone over a grid of row-kernel launch parameters (register tiles of 1/2/4 x
16 x 256 for the shrink's accumulator, 1/2 x 16 x 1024 elements for the expand's slab, with and
without the expand's prefetch), then the pair with the best of each, beside the default pair
(`tile_pair_us`: the tile kernels' configs, `lora_config.tile_shrink_config` /
`tile_expand_config`, whatever the default picks) and it with reduce.
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
from punica.ops.lora_config import tile_expand_config, tile_shrink_config

IN_F, OUT_F = 4096, 11008
CASES = [lc.Case("distinct", bs, 16) for bs in (1, 8, 32, 64, 128)] + [
    lc.Case(m, 64, 16) for m in ("uniform", "identical")] + [
    lc.Case("identical", 1, 16), lc.Case("distinct", 64, 32), lc.Case("distinct", 64, 64)]


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


def probe(case: lc.Case) -> dict[str, object]:
    b = lc.build(case, IN_F, OUT_F, torch.float16, 60 << 20)
    R = case.rank
    row: dict[str, object] = {"case": dataclasses.asdict(case)}
    tile_s = tile_shrink_config(case.bs, b.num_adapters, IN_F, R)
    tile_e = dataclasses.replace(tile_expand_config(case.bs, b.num_adapters, OUT_F, R),
                                 use_pdl=None)
    tile_r = dataclasses.replace(tile_s, reduce=True)
    row["tile_pair_us"] = timed(b, lambda b, c: lc.ours(b, c, tile_s, tile_e))
    row["tile_reduce_pair_us"] = timed(b, lambda b, c: lora.add_lora(
        c.y, c.x, b.A, b.B, c.indptr, c.slots, b.ranks, b.scales, b.workspace, shrink=tile_r,
        expand=tile_e))
    shrinks = {}
    block_r = min(64, max(16, R))
    for splits, acc, warps in itertools.product((4, 8, 16), (1, 2, 4), (4, 8)):
        block_k = acc * 16 * 256 // block_r
        cfg = lora.ShrinkConfig(block_m=1, block_r=block_r, block_k=block_k,
                                num_splits=splits, num_warps=warps)
        if IN_F // splits < block_k:
            continue
        shrinks[cfg] = timed(b, shrink_only, cfg)
    expands = {}
    # slab 1/2: the 512-column slabs the default takes up to 8 rows (bs 8 measured 11.0 us
    # against 7.2 at bs 16 in lora_op.json, b301dcc)
    for half_slabs, warps, tiles, prefetch in itertools.product((1, 2, 4), (4, 8), (1, 2),
                                                                (True, False)):
        block_n = half_slabs * 8 * 1024 // max(16, R)
        cfg = lora.ExpandConfig(block_m=1, block_n=block_n, block_r=max(16, R),
                                tiles_per_program=tiles, num_warps=warps, prefetch=prefetch)
        expands[cfg] = timed(b, expand_only, cfg, 4)
    best_s = sorted(shrinks, key=shrinks.get)[:3]
    best_e = min(expands, key=expands.get)
    row["shrink_top"] = [(dataclasses.asdict(c), shrinks[c]) for c in best_s]
    row["expand_best"] = (dataclasses.asdict(best_e), expands[best_e])
    pairs = {}
    for s in best_s:
        for red in (False, True):
            s2 = dataclasses.replace(s, reduce=red)
            e = dataclasses.replace(best_e, use_pdl=None)
            pairs[(s2, e)] = timed(b, lambda b, c, s2=s2, e=e: lc.ours(b, c, s2, e)) if not red \
                else timed(b, lambda b, c, s2=s2, e=e: lora.add_lora(
                    c.y, c.x, b.A, b.B, c.indptr, c.slots, b.ranks, b.scales, b.workspace,
                    shrink=s2, expand=e))
    (s, e), t = min(pairs.items(), key=lambda kv: kv[1])
    row["rows_pair_us"] = t
    row["rows_pair"] = {"shrink": dataclasses.asdict(s), "expand": dataclasses.asdict(e)}
    row["floor_us"] = b.floor_bytes(IN_F, OUT_F) / (COPY_TBPS * 1e12) * 1e6
    return row


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    COPY_TBPS = copy_bandwidth_TBps()
    rows = []
    for case in CASES:
        r = probe(case)
        rows.append(r)
        print(f"{case}: floor {r['floor_us']:.1f} tile {r['tile_pair_us']:.2f} "
              f"tile+reduce {r['tile_reduce_pair_us']:.2f} rows {r['rows_pair_us']:.2f} "
              f"| shrink {r['shrink_top'][0]} | expand {r['expand_best']} | {r['rows_pair']}",
              flush=True)
    info = run_info("python scripts/row_probe.py $OUT")
    (out / "row_probe.json").write_text(json.dumps({**info, "copy_TBps": COPY_TBPS,
                                                    "rows": rows}, indent=1))
