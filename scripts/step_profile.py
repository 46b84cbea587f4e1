"""Where a decode step's GPU time goes: kernel times of eager steps grouped by kernel, beside the
same step replayed in a CUDA graph (diagnostics; prints a table, writes OUT_DIR/step_profile.json).

    python scripts/step_profile.py OUT_DIR [--arch llama2-7b] [--batch 32] [--context 512]
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from punica.bench.rig import Rig, median_ms, mix_slots
from punica.bench.timing import run_info
from punica.models.random import llama2_7b, tiny


def family(name: str) -> str:
    """A short group name for a kernel: SGMV, attention, GEMM (cuBLAS/cutlass), elementwise..."""
    rules = (("sgmv_shrink", "lora shrink"), ("sgmv_expand", "lora expand"),
             ("paged|attend|decode_kernel|reduce_kernel|write_kv", "attention"),
             ("gemm|gemv|cutlass|sm90_xmma|cublas|nvjet", "gemm"),
             ("reduce|norm|mean|rsqrt", "reductions"), ("elementwise|vectorized|unrolled",
                                                        "elementwise"),
             ("index|gather|embedding|cat|copy", "index/copy"))
    for pattern, label in rules:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "other"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--arch", choices=("llama2-7b", "tiny"), default="llama2-7b")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=512)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    arch = llama2_7b() if args.arch == "llama2-7b" else tiny()
    rig = Rig.build(arch, torch.float16, device, args.batch * args.context + 64, args.batch, 16,
                    args.batch, max_decode_batch=args.batch)
    result: dict[str, object] = {**run_info("python scripts/step_profile.py"),
                                 "batch": args.batch, "context": args.context, "mixes": {}}
    for mix in ("distinct", "none"):
        b = rig.batch([1] * args.batch, [args.context] * args.batch, mix_slots(mix, args.batch))
        use = mix != "none"
        graph_ms = median_ms(lambda b=b, use=use: rig.step(b, use), device)
        eager_ms = median_ms(lambda b=b, use=use: rig.step(b, use, use_graphs=False), device, 5)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(3):
                rig.step(b, use, use_graphs=False)
            if device.type == "cuda":
                torch.cuda.synchronize()
        if device.type == "cuda":
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30))
        kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        for ev in prof.key_averages():
            t = getattr(ev, "device_time_total", 0.0) or getattr(ev, "cuda_time_total", 0.0)
            if ev.device_type == torch.autograd.DeviceType.CUDA and t > 0:
                kernels[ev.key][0] += t / 3 / 1e3  # ms per step
                kernels[ev.key][1] += ev.count // 3
        groups: dict[str, float] = defaultdict(float)
        for name, (ms, _) in kernels.items():
            groups[family(name)] += ms
        top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:25]
        result["mixes"][mix] = {"graph_ms": graph_ms, "eager_ms": eager_ms,
                                "kernel_ms": sum(g for g in groups.values()),
                                "groups_ms": dict(groups),
                                "top": [(n[:120], ms, cnt) for n, (ms, cnt) in top]}
        print(f"== {mix}: graph {graph_ms:.2f} ms, eager {eager_ms:.2f} ms, kernels "
              f"{sum(groups.values()):.2f} ms")
        for g, ms in sorted(groups.items(), key=lambda kv: -kv[1]):
            print(f"   {g:>12}: {ms:7.3f} ms")
        for n, (ms, cnt) in top:
            print(f"   {ms:7.3f} ms  x{cnt:<4} {n[:110]}")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_profile.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
