"""Where the steps of a text-generation run go on the GPU, per adapter mix (diagnostics; prints a
table, writes OUT_DIR/textgen_profile.json).

    python scripts/textgen_profile.py OUT_DIR [--arch llama2-7b] [--num-requests 100] [--cap 32]
        [--mixes distinct,skewed] [--at 300] [--steps 200] [--decode-split-tokens 512]

The engine of `punica bench textgen` (same random model, workload, cap, adapter slots, async
scheduling), all requests submitted at once. At each step number of `--at` (a window: 300 is
past the first admissions; later ones see admissions mid-run and the run's shrinking tail),
`steps` steps are timed on the host clock (ms per step), then the next `steps` are profiled on
the device only (no host-side tracing to slow the host): the GPU's busy time per step (union of
kernel and copy intervals), kernel families (host-to-device copies are the adapter loads and the
batch inputs) and the idle rest. Made to find why Distinct runs ~1 ms per step slower than
Skewed over a textgen run while at a full batch its step is ~0.5 ms slower
(benchmarks/results/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from step_profile import print_row, profile_steps

from punica.bench.textgen import add_requests
from punica.bench.timing import run_info
from punica.bench.workloads import adapter_of_requests, request_lengths
from punica.config import CacheConfig, EngineConfig, LoraConfig, ModelConfig
from punica.engine.llm_engine import LLMEngine
from punica.engine.scheduler import SchedulerConfig
from punica.models.random import llama2_7b, random_adapter, random_model, tiny


def build_engine(model: torch.nn.Module, device: torch.device, cap: int, num_requests: int,
                 rank: int, maxlen: int, decode_split_tokens: int) -> LLMEngine:
    return LLMEngine(EngineConfig(
        model=ModelConfig("<random weights>", device=str(device), max_model_len=maxlen,
                          decode_split_tokens=decode_split_tokens),
        cache=CacheConfig(kv_cache_bytes=1 << 30),
        lora=LoraConfig(max_loras=min(256, num_requests), max_lora_rank=rank),
        scheduler=SchedulerConfig(max_num_seqs=cap or 512, max_num_batched_tokens=8192)),
        model=model)


def steps_ms(engine: LLMEngine, steps: int) -> float:
    """Host-clock ms per step over `steps` steps (the engine's own pace, async included)."""
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step(updates=False)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    ap.add_argument("--arch", choices=("llama2-7b", "tiny"), default="llama2-7b")
    ap.add_argument("--num-requests", type=int, default=100)
    ap.add_argument("--maxlen", type=int, default=2048)
    ap.add_argument("--cap", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--mixes", default="distinct,skewed")
    ap.add_argument("--at", default="300", help="step numbers where the windows start")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--decode-split-tokens", type=int,
                    default=ModelConfig("").decode_split_tokens)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    arch = llama2_7b() if args.arch == "llama2-7b" else tiny()
    model = random_model(arch, torch.float16, device)
    base = random_adapter("base", arch, args.rank)
    requests = request_lengths(args.num_requests, args.maxlen, seed=0)
    result: dict[str, object] = {**run_info("python scripts/textgen_profile.py"),
                                 **vars(args), "mixes": {}}
    for mix in args.mixes.split(","):
        engine = build_engine(model, device, args.cap, args.num_requests, args.rank,
                              args.maxlen, args.decode_split_tokens)
        engine.warmup()
        ids = adapter_of_requests(mix, len(requests))
        for i in sorted(set(ids)):
            engine.add_lora_weights(random_adapter(f"a{i}", arch, args.rank, shared=base))
        add_requests(engine, requests, [f"a{i}" for i in ids], arch.vocab_size, mix)
        done, windows = 0, []
        for at in sorted(int(a) for a in args.at.split(",")):
            for _ in range(max(0, at - done)):
                engine.step(updates=False)
            if not engine.has_unfinished():
                break
            running = len(engine.scheduler.running)
            wall_ms = steps_ms(engine, args.steps)
            row = profile_steps(lambda e=engine: e.step(updates=False), device, args.steps,
                                trace_cpu=False)
            done = max(at, done) + 2 * args.steps
            row.update(at=at, step_ms=wall_ms, running_at_start=running,
                       step_stats=engine.step_stats.summary())
            windows.append(row)
            print_row(f"{mix} at step {at} ({running} running)", row, wall_ms, top=20)
        result["mixes"][mix] = windows
        del engine
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "textgen_profile.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
