"""One sliced add_lora against one call per projection, for the fused projections of LLaMA-7B.

    punica bench lora-slices [--out-dir benchmarks/results] [--rank 16]

q/k/v (4096 -> 3 x 4096) and gate/up (4096 -> 2 x 11008), fp16, Distinct and Identical batches of
1, 8, 32 and 64 rows: the deltas of every projection by S separate `add_lora` calls (own pools,
as before LoRA slices) and by one call with `slices` over the fused pools (A rows and B columns
side by side, as the engine now does). Both in a CUDA graph over rotating problems (cold weights),
beside the floor (every used adapter's A and B, x, and y read and written once, over the copy
bandwidth measured in the same run). Each row also checks that both give the same y.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from punica.bench.timing import copy_bandwidth_TBps, graph_us, run_info
from punica.bench.workloads import indptr_of, segment_lengths
from punica.models.arch import ModelArch
from punica.models.random import llama2_7b
from punica.models.registry import layout_of
from punica.ops import lora


def fused_groups(arch: ModelArch) -> dict[str, tuple[int, tuple[int, ...]]]:
    """group -> (in_features, output widths) of the family's LoRA groups of several projections
    (LLaMA-7B: q/k/v 4096 -> 3 x 4096, gate/up 4096 -> 2 x 11008)."""
    layout = layout_of(arch)
    return {group: (layout.shape(arch, projs[0])[0],
                    tuple(layout.shape(arch, p)[1] for p in projs))
            for group, projs in layout.groups if len(projs) > 1}


@dataclass
class SlicedBench:
    """Rotating calls over fused pools; `split()` views them as per-projection pools."""

    x: list[torch.Tensor]
    y: list[torch.Tensor]
    indptr: list[torch.Tensor]
    slots: list[torch.Tensor]
    A: torch.Tensor  # [slots, S*R, in]
    B: torch.Tensor  # [slots, R, sum(widths)]
    ranks: torch.Tensor  # [S, slots]
    scales: torch.Tensor  # [S, slots]
    widths: tuple[int, ...]
    workspace: torch.Tensor
    separate: list[tuple[torch.Tensor, torch.Tensor]]  # contiguous per-projection (A, B)

    def sliced(self, i: int) -> None:
        lora.add_lora(self.y[i], self.x[i], self.A, self.B, self.indptr[i], self.slots[i],
                      self.ranks, self.scales, self.workspace, slices=self.widths)

    def per_projection(self, i: int) -> None:
        start = 0
        for s, (w, (A, B)) in enumerate(zip(self.widths, self.separate, strict=True)):
            lora.add_lora(self.y[i][:, start:start + w], self.x[i], A, B, self.indptr[i],
                          self.slots[i], self.ranks[s].contiguous(), self.scales[s].contiguous(),
                          self.workspace)
            start += w


def build(mix: str, bs: int, rank: int, in_f: int, widths: tuple[int, ...],
          dtype: torch.dtype, device: torch.device, l2_bytes: int) -> SlicedBench:
    lengths = segment_lengths(mix, bs)
    S, out_f = len(widths), sum(widths)
    per_call = (len(lengths) * rank * (S * in_f + out_f) + bs * (in_f + 2 * out_f)) * 2
    rotations = min(64, max(2, math.ceil(4 * l2_bytes / per_call)))
    num_slots = rotations * len(lengths)
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)

    A = randn(num_slots, S * rank, in_f, scale=in_f**-0.5)
    B = randn(num_slots, rank, out_f, scale=0.1)
    ranks = torch.full((S, num_slots), rank, dtype=torch.int32, device=device)
    scales = (torch.rand(S, num_slots, generator=gen) + 0.5).to(device)
    bounds = indptr_of(lengths)
    starts = [sum(widths[:s]) for s in range(S)]
    separate = [(A[:, s * rank:(s + 1) * rank].contiguous(),
                 B[:, :, starts[s]:starts[s] + widths[s]].contiguous()) for s in range(S)]
    i32 = dict(dtype=torch.int32, device=device)
    return SlicedBench(
        x=[randn(bs, in_f, scale=1.0) for _ in range(rotations)],
        y=[randn(bs, out_f, scale=1.0) for _ in range(rotations)],
        indptr=[torch.tensor(bounds, **i32) for _ in range(rotations)],
        slots=[torch.arange(r * len(lengths), (r + 1) * len(lengths), **i32)
               for r in range(rotations)],
        A=A, B=B, ranks=ranks, scales=scales, widths=widths,
        workspace=torch.zeros(lora.workspace_numel(bs, rank, S), device=device),
        separate=separate)


def agreement(b: SlicedBench) -> float:
    """Relative difference of y after one sliced call and after the per-projection calls."""
    y0 = b.y[0].clone()
    b.sliced(0)
    sliced = b.y[0].clone()
    b.y[0].copy_(y0)
    b.per_projection(0)
    diff = (sliced.double() - b.y[0].double()).norm() / (sliced.double() - y0.double()).norm()
    b.y[0].copy_(y0)
    return float(diff)


def floor_bytes(b: SlicedBench, bs: int, in_f: int) -> int:
    adapters = b.slots[0].numel()
    rank, S, out_f = b.B.shape[1], len(b.widths), sum(b.widths)
    return (adapters * rank * (S * in_f + out_f) + bs * (in_f + 2 * out_f)) * 2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="punica bench lora-slices",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    copy = copy_bandwidth_TBps()
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    rows = []
    for group, (in_f, widths) in fused_groups(llama2_7b()).items():
        for mix in ("distinct", "identical"):
            for bs in (1, 8, 32, 64):
                b = build(mix, bs, args.rank, in_f, widths, torch.float16, device, l2)
                n = len(b.x)
                row = {"group": group, "mix": mix, "bs": bs, "rank": args.rank,
                       "sliced_us": graph_us([lambda i=i, b=b: b.sliced(i) for i in range(n)]),
                       "per_projection_us": graph_us(
                           [lambda i=i, b=b: b.per_projection(i) for i in range(n)]),
                       "floor_us": floor_bytes(b, bs, in_f) / (copy * 1e12) * 1e6,
                       "rel_diff": agreement(b)}
                rows.append(row)
                print(f"{group:8s} {mix:9s} bs {bs:3d}: sliced {row['sliced_us']:7.2f} us, "
                      f"per projection {row['per_projection_us']:7.2f} us, floor "
                      f"{row['floor_us']:6.2f} us, rel diff {row['rel_diff']:.1e}", flush=True)
                del b
    info = run_info("punica bench lora-slices " + " ".join(argv or sys.argv[1:]))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lora_slices.json").write_text(json.dumps({**info, "copy_TBps": copy, "rows": rows},
                                                     indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
