"""The Punica text-generation workload through the engine, on random weights.

    punica bench textgen [--num-requests 1000] [--mixes ...] [--caps 32,0] [--hf-requests 8]

All requests are submitted at once; throughput counts (prompt + output tokens) / wall time as the
paper does, and output tokens / wall time. Side by side in the same run: the engine with LoRA off
(backbone only), and HF transformers + PEFT `generate(adapter_names=...)` on the workload's first
--hf-requests requests (in padded batches of --hf-batch, real tokens counted) beside the engine on
exactly those requests (row mix "hf-requests", with `vs_hf_peft`: its speed-up).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from punica.bench import textgen_floor
from punica.bench.rig import adapter_bytes, copy_GBps, kv_bytes_per_token, weight_bytes
from punica.bench.timing import run_info
from punica.bench.workloads import adapter_of_requests, request_lengths
from punica.config import CacheConfig, EngineConfig, LoraConfig, ModelConfig
from punica.engine.llm_engine import LLMEngine
from punica.engine.sampling_params import SamplingParams
from punica.engine.scheduler import SchedulerConfig
from punica.models.random import llama2_7b, random_adapter, random_model, tiny
from punica.models.registry import layout_of


def add_requests(engine: LLMEngine, requests: list[tuple[int, int]],
                 adapters: list[str | None], vocab: int, label: str) -> None:
    """Every request at once: random prompt ids of its length, greedy, exactly its output
    length."""
    gen = torch.Generator().manual_seed(0)
    for i, ((p_len, o_len), name) in enumerate(zip(requests, adapters, strict=True)):
        prompt = torch.randint(1, vocab, (p_len,), generator=gen).tolist()
        engine.add_request(f"{label}-{i}", prompt, SamplingParams(
            max_tokens=o_len, temperature=0.0, ignore_eos=True), name)


def rehearse(engine: LLMEngine, requests: list[tuple[int, int]], adapters: list[str | None],
             vocab: int, label: str) -> float:
    """Untimed: the same requests with one output token each, from the same empty engine, so the
    run's first step (and the prefill steps after it) meet their Triton kernels here, compiled,
    and not inside the timed run, as the graph captures happen in `warmup`. Returns the seconds
    it took. (The 100-request runs of 42111e7 and 90c4640 charged those compiles to the eager
    first step of whichever mix met a launch shape first: 1-2 s of a 20-31 s run.)"""
    start = time.perf_counter()
    add_requests(engine, [(p_len, 1) for p_len, _ in requests], adapters, vocab,
                 f"{label}-rehearsal")
    while engine.has_unfinished():
        engine.step(updates=False)
    return time.perf_counter() - start


def run_engine(engine: LLMEngine, requests: list[tuple[int, int]], adapters: list[str | None],
               vocab: int, label: str) -> dict[str, float]:
    add_requests(engine, requests, adapters, vocab, label)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    engine.step_stats.reset()
    start, done, out_tokens = time.perf_counter(), 0, 0
    with tqdm(total=len(requests), desc=label, unit="req") as bar:
        while engine.has_unfinished():
            for out in engine.step(updates=False):
                if out.finished:
                    done += 1
                    out_tokens += len(out.token_ids)
                    bar.update()
    wall = time.perf_counter() - start
    total = sum(p for p, _ in requests) + out_tokens
    return {"wall_s": wall, "tok_s": total / wall, "output_tok_s": out_tokens / wall,
            "requests": done, "step_stats": engine.step_stats.summary()}


def floor_report(engine: LLMEngine, requests: list[tuple[int, int]],
                 adapters: list[str | None], rank: int, copy_gbps: float,
                 stats: dict[str, object]) -> dict[str, object]:
    """floor_tok_s of the run: its schedule replayed without a model, each step at the bytes it
    must read ÷ the copy bandwidth measured in this run (punica.bench.textgen_floor)."""
    r = textgen_floor.replay(requests, adapters, engine.config.scheduler,
                             engine.slots.num_slots, engine.scheduler.blocks.num_blocks,
                             engine.config.cache.block_size)
    elem = engine.runner.kv_cache.element_size()
    floor = textgen_floor.floor_s(r, weight_bytes(engine.runner.model),
                                  adapter_bytes(engine.arch, rank, elem),
                                  kv_bytes_per_token(engine.arch, elem), copy_gbps)
    return {"floor_tok_s": r.tokens / floor, "floor_s": floor, "replay_steps": r.steps,
            "share_of_floor": floor / stats["wall_s"]}


def same_requests_as_hf(engine: LLMEngine, sub: list[tuple[int, int]], names: dict[int, str],
                        arch: object, rank: int, base: object,
                        hf_row: dict[str, object]) -> dict[str, object]:
    """The engine on exactly HF + PEFT's requests (Distinct adapters), and its speed-up."""
    for i in range(len(sub)):
        if names[i] not in engine.registry:
            engine.add_lora_weights(random_adapter(names[i], arch, rank, shared=base))
    adapters = [names[i] for i in range(len(sub))]
    rehearse(engine, sub, adapters, arch.vocab_size, "hf requests")
    stats = run_engine(engine, sub, adapters, arch.vocab_size, "hf requests")
    return {"engine": "punica", "mix": "hf-requests", "cap": engine.config.scheduler.max_num_seqs,
            **stats, "vs_hf_peft": stats["tok_s"] / hf_row["tok_s"]}


def _breakdown(s: dict[str, float]) -> str:
    return (f"; per step: schedule {s['schedule_ms']:.2f} + forward {s['forward_ms']:.2f} + "
            f"sample/wait {s['sample_ms']:.2f} + finish {s['finish_ms']:.2f} ms over "
            f"{s['steps']} steps ({s['eager_steps']} eager)")


def memory_report(engine: LLMEngine) -> dict[str, float]:
    """How the KV pool was sized (engine/sizing.py: the budget, the step and graph reserves
    measured at start) and (CUDA) the peak the caching allocator reserved so far, beside the
    device's memory and the budget's ceiling (gpu_memory_utilization x that memory)."""
    plan = engine.runner.memory
    out = {"kv_pool_gib": plan.kv_bytes / 2**30, "step_reserve_gib": plan.step_peak / 2**30,
           "graph_reserve_gib": plan.graph_reserve / 2**30}
    if plan.budget:
        out["kv_share_of_budget"] = plan.kv_bytes / plan.budget
    if engine.device.type == "cuda":
        total = torch.cuda.get_device_properties(engine.device).total_memory
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(engine.device) / 2**30
        out["device_gib"] = total / 2**30
        out["ceiling_gib"] = engine.config.cache.gpu_memory_utilization * total / 2**30
    return out


def hf_peft(arch_name: str, requests: list[tuple[int, int]], adapter_ids: list[int], rank: int,
            device: torch.device, batch: int) -> dict[str, float]:
    """HF transformers + PEFT mixed-adapter generate on the same shape (random weights) over
    the same requests as the engine: each request its own prompt length (left-padded in its
    batch of `batch`) and output length (a batch generates its longest; the surplus is HF's
    cost and is not counted). Throughput counts only real tokens: each request's prompt +
    output, as for the engine."""
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    a = llama2_7b() if arch_name == "llama2-7b" else tiny()
    cfg = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.hidden_size,
                      intermediate_size=a.intermediate_size, num_hidden_layers=a.num_layers,
                      num_attention_heads=a.num_heads, num_key_value_heads=a.num_kv_heads,
                      max_position_embeddings=a.max_position_embeddings, pad_token_id=0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.float16)
    layout = layout_of(a)
    targets = [layout.leaf(p) for p in layout.projections]
    names = [f"a{i}" for i in sorted(set(adapter_ids))]
    model = get_peft_model(model, PeftLora(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                           init_lora_weights=False), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, PeftLora(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                         init_lora_weights=False))
    model = model.to(device=device, dtype=torch.float16).eval()
    real, generated = 0, 0
    start = time.perf_counter()
    for lo in range(0, len(requests), batch):
        chunk, ids_of = requests[lo:lo + batch], adapter_ids[lo:lo + batch]
        width, new = max(p for p, _ in chunk), max(o for _, o in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for row, (p, _) in enumerate(chunk):  # left padding, as generate expects
            ids[row, width - p:] = torch.randint(1, a.vocab_size, (p,), device=device)
            mask[row, width - p:] = 1
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                           min_new_tokens=new, do_sample=False,
                           adapter_names=[f"a{i}" for i in ids_of])
        real += sum(p + o for p, o in chunk)
        generated += sum(o for _, o in chunk)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return {"wall_s": wall, "tok_s": real / wall, "output_tok_s": generated / wall,
            "requests": len(requests),
            "note": f"the engine's first {len(requests)} requests, batches of {batch}, "
                    "left-padded; real tokens only"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="punica bench textgen", description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=("llama2-7b", "tiny"), default="llama2-7b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--maxlen", type=int, default=2048)
    ap.add_argument("--mixes", default="distinct,uniform,skewed,identical")
    ap.add_argument("--caps", default="32,0", help="max_num_seqs per run (0: uncapped, 512)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--max-loras", type=int, default=256,
                    help="adapter slots (at most --num-requests); with Distinct each running "
                    "request holds one, so fewer cap the uncapped runs' batch (128 slots: 5,783 "
                    "tok/s against 6,089 with 256 at 1,000 requests, benchmarks/results)")
    ap.add_argument("--hf-requests", type=int, default=8, help="0 skips HF + PEFT")
    ap.add_argument("--lora-off-baseline", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the same requests with LoRA off after each cap's mixes")
    ap.add_argument("--hf-batch", type=int, default=4,
                    help="HF + PEFT batch size (its requests padded to the longest)")
    ap.add_argument("--rehearsal", action=argparse.BooleanOptionalAction, default=True,
                    help="before each timed run, the same requests untimed with one output "
                    "token each (Triton compiles out of the timed run)")
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                    help="the engine schedules step k+1 while step k runs")
    ap.add_argument("--kv-cache-gb", type=float, default=2.0, help="KV pool size on the CPU")
    ap.add_argument("--decode-split-tokens", type=int, default=ModelConfig("").decode_split_tokens,
                    help="the engine's decode attention split (0: never split)")
    ap.add_argument("--out-dir", default="benchmarks/results")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    arch = llama2_7b() if args.arch == "llama2-7b" else tiny()
    model = random_model(arch, torch.float16, device)
    requests = request_lengths(args.num_requests, args.maxlen, seed=0)
    base = random_adapter("base", arch, args.rank)
    rows: list[dict[str, object]] = []
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = run_info("punica bench textgen " + " ".join(argv or sys.argv[1:]))
    copy_gbps = copy_GBps(device, 1 << 28 if device.type == "cuda" else 1 << 20)
    info["copy_GBps"] = copy_gbps

    def save() -> None:  # after every run, so a run cut short still leaves its rows
        (out / "textgen.json").write_text(json.dumps(
            {**info, "arch": args.arch, "num_requests": args.num_requests,
             "async_scheduling": args.async_scheduling,
             "decode_split_tokens": args.decode_split_tokens,
             "maxlen": args.maxlen, "rows": rows}, indent=1))

    if args.hf_requests:
        sub = requests[: args.hf_requests]
        ids = list(range(len(sub)))
        rows.append({"engine": "hf+peft", "mix": "distinct", "cap": args.hf_batch,
                     **hf_peft(args.arch, sub, ids, args.rank, device, args.hf_batch)})
        save()
        gc.collect()  # the HF model's memory goes back before the engine sizes its KV pool
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for cap in [int(c) for c in args.caps.split(",")]:
        engine = LLMEngine(EngineConfig(
            model=ModelConfig("<random weights>", device=str(device), max_model_len=args.maxlen,
                              decode_split_tokens=args.decode_split_tokens),
            cache=CacheConfig(kv_cache_bytes=int(args.kv_cache_gb * 2**30)),
            lora=LoraConfig(max_loras=min(args.max_loras, args.num_requests),
                            max_lora_rank=args.rank),
            scheduler=SchedulerConfig(max_num_seqs=cap or 512, max_num_batched_tokens=8192,
                                      async_scheduling=args.async_scheduling)),
            model=model)
        warmup_s = engine.warmup()  # graph captures stay out of the timed runs
        names = {i: f"a{i}" for i in range(args.num_requests)}
        if args.hf_requests and not any(r["mix"] == "hf-requests" for r in rows):
            rows.append(same_requests_as_hf(engine, requests[: args.hf_requests], names, arch,
                                            args.rank, base, rows[0]))
            save()
        for mix in args.mixes.split(",") + (["no-lora"] if args.lora_off_baseline else []):
            ids = adapter_of_requests("identical" if mix == "no-lora" else mix, len(requests))
            for i in sorted(set(ids)):
                if names[i] not in engine.registry:
                    engine.add_lora_weights(random_adapter(names[i], arch, args.rank,
                                                           shared=base))
            adapters = [None if mix == "no-lora" else names[i] for i in ids]
            rehearsal_s = (rehearse(engine, requests, adapters, arch.vocab_size, f"{mix} cap {cap}")
                           if args.rehearsal else None)
            stats = run_engine(engine, requests, adapters, arch.vocab_size, f"{mix} cap {cap}")
            rows.append({"engine": "punica", "mix": mix, "cap": cap, **stats,
                         **floor_report(engine, requests, adapters, args.rank, copy_gbps,
                                        stats),
                         **memory_report(engine), "warmup_s": warmup_s,
                         "rehearsal_s": rehearsal_s,
                         "graphs": (engine.runner.graphs.num_graphs if engine.runner.graphs
                                    else 0)})
            save()
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    save()
    for r in rows:
        print(f"{r['engine']:>8} {r['mix']:>9} cap={r['cap']:<4} {r['tok_s']:10.1f} tok/s "
              f"({r['output_tok_s']:.1f} output tok/s, {r['wall_s']:.1f} s)"
              + (f", floor {r['floor_tok_s']:.0f} tok/s" if "floor_tok_s" in r else "")
              + (f", KV pool {r['kv_pool_gib']:.1f} GiB" if "kv_pool_gib" in r else "")
              + (_breakdown(r["step_stats"]) if "step_stats" in r else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
