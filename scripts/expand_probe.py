"""Probe of the expand kernel (diagnostics for tuning; prints, writes nothing).

    python scripts/expand_probe.py time     # expand-only graph time over num_stages / tiles
    python scripts/expand_probe.py once     # a few add_lora calls, for ncu to profile
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from punica.bench import lora_cases as lc
from punica.bench.timing import graph_us
from punica.ops import lora

CASES = (lc.Case("distinct", 1, 16), lc.Case("distinct", 64, 16), lc.Case("identical", 64, 16))


def expand_only(b: lc.Bench, c: lc.Call, cfg: lora.ExpandConfig, splits: int) -> None:
    T, R = c.x.shape[0], b.A.shape[1]
    v = b.workspace[: splits * T * R].view(splits, T, R)
    lora.sgmv_expand(v, b.B, c.indptr, c.slots, b.ranks, b.scales, c.y, cfg)


def time_variants() -> None:
    for case in CASES:
        b = lc.build(case, 4096, 11008, torch.float16, 60 << 20)
        base = lora.expand_config(case.bs, b.num_adapters, 11008, 16)
        for splits in (1, 16):
            for stages in (1, 2, 3):
                for tiles in sorted({1, base.tiles_per_program}):
                    cfg = dataclasses.replace(base, num_stages=stages, tiles_per_program=tiles)
                    t = graph_us([lambda b=b, c=c, cfg=cfg, s=splits: expand_only(b, c, cfg, s)
                                  for c in b.calls])
                    print(f"{case} splits={splits} stages={stages} tiles={tiles}: {t:.2f} us")


def run_once() -> None:
    for case in CASES:
        b = lc.build(case, 4096, 11008, torch.float16, 60 << 20, max_rotations=4)
        for c in b.calls:
            lc.ours(b, c)
    torch.cuda.synchronize()


if __name__ == "__main__":
    time_variants() if sys.argv[1:] == ["time"] else run_once()
