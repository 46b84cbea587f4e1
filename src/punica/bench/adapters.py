"""punica bench adapters: S-LoRA's many-adapters setting on one engine (issue 18).

One Poisson trace of text-generation requests (the Punica workload's lengths) is replayed in real
time against an engine whose adapters are PEFT folders on disk, named by the requests and loaded
just in time (`lora_root`): with 5, 100, 1,000, 2,000 distinct adapters of one rank on q, k, v, o
(S-LoRA's S1), each request's adapter drawn uniformly. The first count is the named baseline of the
same process: `vs_baseline` = throughput ÷ the baseline's (S-LoRA: 0.945 at 2,000 against 5). The
offered load (the trace's tokens ÷ its arrival span) bounds the throughput from above; a run that
keeps up with the trace reaches it.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from punica.bench.timing import run_info
from punica.bench.workloads import request_lengths
from punica.config import CacheConfig, EngineConfig, LoraConfig, ModelConfig
from punica.engine.llm_engine import LLMEngine
from punica.engine.sampling_params import SamplingParams
from punica.engine.scheduler import SchedulerConfig
from punica.lora.peft_writer import save_peft
from punica.models.random import llama2_7b, random_adapter, random_model, tiny


def write_adapters(arch: object, root: Path, count: int, rank: int, targets: tuple[str, ...],
                   dtype: torch.dtype) -> float:
    """Folders a0 .. a{count-1} below root (kept from an earlier run when present); seconds."""
    start = time.perf_counter()
    for k in tqdm(range(count), desc="writing adapters", unit="adapter"):
        folder = root / f"a{k}"
        if not (folder / "adapter_model.safetensors").exists():
            save_peft(random_adapter(f"a{k}", arch, rank, dtype, seed=k, projections=targets),
                      arch, folder)
    return time.perf_counter() - start


Lengths = list[tuple[int, int]]


def trace(n: int, rate: float, maxlen: int, seed: int) -> tuple[list[float], Lengths]:
    """Arrival times (Poisson, `rate` per second) and (prompt, output) lengths."""
    rng = random.Random(seed)
    t, arrivals = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        arrivals.append(t)
    return arrivals, request_lengths(n, maxlen, seed)


def replay(engine: LLMEngine, arrivals: list[float], lengths: Lengths,
           names: list[str], vocab: int, label: str) -> dict[str, object]:
    """Add each request at its arrival time while stepping; throughput over the whole run."""
    gen = torch.Generator().manual_seed(0)
    start, i, done, out_tokens = time.perf_counter(), 0, 0, 0
    with tqdm(total=len(arrivals), desc=label, unit="req") as bar:
        while done < len(arrivals):
            now = time.perf_counter() - start
            while i < len(arrivals) and arrivals[i] <= now:
                prompt_len, out_len = lengths[i]
                prompt = torch.randint(1, vocab, (prompt_len,), generator=gen).tolist()
                engine.add_request(f"r{i}", prompt, SamplingParams(
                    max_tokens=out_len, temperature=0.0, ignore_eos=True), names[i])
                i += 1
            if not engine.has_unfinished():
                time.sleep(max(0.0, min(arrivals[i] - now, 0.01)))
                continue
            if engine.waiting_on_reads():
                time.sleep(0.0005)
                continue
            for out in engine.step(updates=False):
                if out.finished:
                    if out.error is not None:
                        raise RuntimeError(f"{out.request_id} failed: {out.error}")
                    done += 1
                    out_tokens += len(out.token_ids)
                    bar.update()
    wall = time.perf_counter() - start
    total = sum(p for p, _ in lengths) + out_tokens
    stats = engine.registry.stats
    return {"wall_s": wall, "tok_s": total / wall, "output_tok_s": out_tokens / wall,
            "offered_tok_s": total / arrivals[-1], "requests": done,
            "disk_reads": stats["disk_loads"], "read_seconds": stats["load_seconds"],
            "host_evictions": stats["host_evictions"],
            "slot_fills": engine.stats["adapter_loads"],
            "slot_evictions": engine.stats["adapter_evictions"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="punica bench adapters",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=("llama2-7b", "tiny"), default="llama2-7b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--counts", default="5,100,1000,2000")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="q,k,v,o")
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=8.0, help="requests per second (Poisson)")
    ap.add_argument("--maxlen", type=int, default=512)
    ap.add_argument("--max-loras", type=int, default=64)
    ap.add_argument("--max-cpu-loras", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--root", help="adapter folders (default: OUT_DIR/adapter_root)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default="benchmarks/results")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    arch = llama2_7b() if args.arch == "llama2-7b" else tiny()
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    counts = [int(c) for c in args.counts.split(",")]
    out = Path(args.out_dir)
    root = Path(args.root) if args.root else out / "adapter_root"
    write_s = write_adapters(arch, root, max(counts), args.rank,
                             tuple(args.targets.split(",")), dtype)
    model = random_model(arch, dtype, device)
    arrivals, lengths = trace(args.num_requests, args.rate, args.maxlen, args.seed)
    rows = []
    for count in counts:
        rng = random.Random(args.seed + count)
        names = [f"a{rng.randrange(count)}" for _ in arrivals]
        engine = LLMEngine(EngineConfig(
            ModelConfig("<random weights>", device=str(device), max_model_len=args.maxlen),
            CacheConfig(kv_cache_bytes=1 << 30),
            LoraConfig(max_loras=min(args.max_loras, count), max_lora_rank=args.rank,
                       max_cpu_loras=args.max_cpu_loras, lora_root=str(root)),
            SchedulerConfig(max_num_seqs=args.max_num_seqs)), model=model)
        engine.warmup()
        rows.append({"adapters": count, "distinct_used": len(set(names)),
                     **replay(engine, arrivals, lengths, names, arch.vocab_size,
                              f"{count} adapters")})
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for row in rows:
        row["vs_baseline"] = row["tok_s"] / rows[0]["tok_s"]
    result = {**run_info("punica bench adapters " + " ".join(argv or sys.argv[1:])),
              "arch": args.arch, "rank": args.rank, "targets": args.targets,
              "rate": args.rate, "num_requests": args.num_requests, "write_s": write_s,
              "baseline": f"{counts[0]} adapters", "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapters.json").write_text(json.dumps(result, indent=1))
    for r in rows:
        print(f"{r['adapters']:>5} adapters: {r['tok_s']:9.1f} tok/s (offered "
              f"{r['offered_tok_s']:.1f}), {r['vs_baseline']:.3f}x the baseline, "
              f"{r['disk_reads']} reads")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
