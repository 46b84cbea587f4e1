"""Where a decode step's GPU time goes: kernel times grouped by kernel and family, the GPU's busy
time (union of kernel intervals) and the idle rest, for steps replayed in their CUDA graphs (with
LoRA: each shrink beside or after its GEMM; Identical; no LoRA) and eager steps (diagnostics;
prints a table, writes OUT_DIR/step_profile.json).

    python scripts/step_profile.py OUT_DIR [--arch llama2-7b] [--batch 32] [--context 512]
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from punica.bench.rig import Rig, median_ms, mix_slots
from punica.bench.timing import run_info
from punica.models.random import llama2_7b, tiny


def family(name: str) -> str:
    """A short group name for a kernel: SGMV, attention, GEMM (cuBLAS/cutlass), elementwise..."""
    rules = (("sgmv_shrink", "lora shrink"), ("sgmv_expand", "lora expand"),
             ("Memcpy HtoD|Memset", "host-to-device copies"),
             ("kv_write|rotary", "rotary + KV write"), ("rms_norm", "rms norm"),
             ("silu_and_mul", "silu*mul"),
             ("gemm|gemv|cutlass|sm90_xmma|cublas|nvjet|splitK", "gemm"),
             ("paged|decode_reduce", "attention"),
             ("reduce|norm|mean|rsqrt", "reductions"), ("elementwise|vectorized|unrolled",
                                                        "elementwise"),
             ("index|gather|embedding|cat|copy", "index/copy"))
    for pattern, label in rules:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "other"


STEPS = 3


def profile_steps(step: Callable[[], object], device: torch.device, steps: int = STEPS,
                  trace_cpu: bool = True) -> dict[str, object]:
    """Kernel times of `steps` steps (per step): by kernel, by family, and the GPU's busy time
    (the union of the kernels' intervals: kernels on two streams overlap). trace_cpu False
    records only the device's activity (no host-side op tracing to slow the host down)."""
    acts = [ProfilerActivity.CPU] if trace_cpu or device.type != "cuda" else []
    acts += [ProfilerActivity.CUDA] if device.type == "cuda" else []
    step()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    spans: list[tuple[float, float]] = []
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        start, end = ev.time_range.start, ev.time_range.end  # microseconds
        kernels[ev.name][0] += (end - start) / steps / 1e3
        kernels[ev.name][1] += 1
        spans.append((start, end))
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    groups: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for name, (ms, cnt) in kernels.items():
        groups[family(name)] += ms
        counts[family(name)] += cnt // steps
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:25]
    return {"kernel_ms": sum(groups.values()), "busy_ms": busy / steps / 1e3,
            "kernels_per_step": sum(c for _, c in kernels.values()) // steps,
            "groups_ms": dict(groups), "groups_count": dict(counts),
            "top": [(n[:120], ms, cnt // steps) for n, (ms, cnt) in top]}


def print_row(name: str, row: dict[str, object], step_ms: float, top: int = 12) -> None:
    """One profiled variant: its step beside the GPU's busy time, families, top kernels."""
    print(f"== {name}: step {step_ms:.2f} ms, kernels {row['kernel_ms']:.2f} ms "
          f"({row['kernels_per_step']} per step), GPU busy {row['busy_ms']:.2f} ms, "
          f"idle {step_ms - row['busy_ms']:.2f} ms")
    groups, counts = row["groups_ms"], row["groups_count"]
    for g, ms in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"   {g:>22}: {ms:7.3f} ms  x{counts[g]}")
    for n, ms, cnt in row["top"][:top]:
        print(f"   {ms:7.3f} ms  x{cnt:<4} {n[:110]}")


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
                                 "batch": args.batch, "context": args.context, "variants": {}}
    # (name, mix, graphs, shrink beside its GEMM); the engine's eager steps: shrink after
    variants = [("distinct graph", "distinct", True, True),
                ("distinct graph, shrink after GEMM", "distinct", True, False),
                ("identical graph", "identical", True, True),
                ("none graph", "none", True, False),
                ("distinct eager", "distinct", False, False),
                ("distinct eager, shrink beside GEMM", "distinct", False, True),
                ("none eager", "none", False, False)]
    for name, mix, graphs, beside in variants:
        b = rig.batch([1] * args.batch, [args.context] * args.batch, mix_slots(mix, args.batch))
        use = mix != "none"

        def step(b=b, use=use, graphs=graphs, beside=beside) -> None:
            rig.step(b, use, use_graphs=graphs, beside=beside)

        step_ms = median_ms(step, device, 20 if graphs else 5)
        row = profile_steps(step, device)
        row["step_ms"] = step_ms
        result["variants"][name] = row
        print_row(name, row, step_ms)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_profile.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
