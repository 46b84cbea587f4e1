"""Steady-state decode and prefill step benchmark on random weights (LLaMA-2-7B shape by default).

    punica bench decode [--batches 1,8,32,64,128] [--contexts 512,2048] [--mixes ...] [--rank 16]

Each row times one decode step (one new token for each of `batch` sequences whose context is
`context` tokens) for an adapter mix (or none: no LoRA), beside its floor: weights + the batch's
distinct adapters + the KV it reads, over the copy bandwidth measured in the same run. Prefill rows
time steps of --prefill-tokens new tokens beside FLOPs / the measured fp16 matmul rate.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from punica.bench.rig import Rig, copy_GBps, matmul_TFLOPs, median_ms, mix_slots
from punica.bench.timing import run_info
from punica.models.llama import decode_split_of
from punica.models.random import llama2_7b, tiny


def decode_row(rig: Rig, batch: int, context: int, mix: str, rank: int, copy_gbps: float,
               reps: int) -> dict[str, object]:
    slots = mix_slots(mix, batch)
    b = rig.batch([1] * batch, [context] * batch, slots)
    ms = median_ms(lambda: rig.step(b, mix != "none"), rig.device, reps)
    # the named baseline, same process: each LoRA shrink after its GEMM, not beside it
    after_ms = (median_ms(lambda: rig.step(b, True, beside=False), rig.device, reps)
                if mix != "none" else None)
    # and where the engine splits the contexts over the KV length: the unsplit attention
    unsplit_ms = (median_ms(lambda: rig.step(b, mix != "none", split=False), rig.device, reps)
                  if decode_split_of(rig.decode_split, b) is not None else None)
    adapters = len(set(slots) - {-1})
    moved = (rig.weight_bytes() + adapters * rig.adapter_bytes(rank)
             + batch * context * rig.kv_bytes_per_token())
    floor_ms = moved / (copy_gbps * 1e9) * 1e3
    return {"kind": "decode", "mix": mix, "batch": batch, "context": context, "step_ms": ms,
            "tok_s": batch / (ms * 1e-3), "step_ms_shrink_after": after_ms,
            "step_ms_unsplit": unsplit_ms,
            "floor_ms": floor_ms, "floor_tok_s": batch / (floor_ms * 1e-3), "bytes": moved}


def prefill_row(rig: Rig, tokens: int, seqs: int, tflops: float, reps: int) -> dict[str, object]:
    per = tokens // seqs
    b = rig.batch([per] * seqs, [per] * seqs, [-1] * seqs)
    ms = median_ms(lambda: rig.step(b, False), rig.device, reps)
    a = rig.arch
    proj_params = sum(p.numel() for n, p in rig.model.named_parameters() if "proj" in n)
    head_params = a.hidden_size * a.vocab_size  # logits only for each sequence's last row
    attn = 4 * a.num_layers * a.num_heads * a.head_dim * seqs * per * per / 2  # causal QK + PV
    flops = 2 * proj_params * tokens + 2 * head_params * seqs + attn
    floor_ms = flops / (tflops * 1e12) * 1e3
    return {"kind": "prefill", "mix": "none", "batch": seqs, "context": per, "step_ms": ms,
            "tok_s": tokens / (ms * 1e-3), "floor_ms": floor_ms,
            "floor_tok_s": tokens / (floor_ms * 1e-3), "flops": flops}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="punica bench decode", description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=("llama2-7b", "tiny"), default="llama2-7b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", default="1,8,32,64,128")
    ap.add_argument("--contexts", default="512,2048")
    ap.add_argument("--mixes", default="distinct,uniform,skewed,identical,none")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--prefill-tokens", type=int, default=8192)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--kv-tokens", type=int, default=131072,
                    help="KV pool of the rig in tokens (rows needing more are skipped)")
    ap.add_argument("--out-dir", default="benchmarks/results")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    arch = llama2_7b() if args.arch == "llama2-7b" else tiny()
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    mixes = args.mixes.split(",")
    kv_tokens = max(args.kv_tokens, args.prefill_tokens)
    rig = Rig.build(arch, torch.float16, device, kv_tokens, max(batches), args.rank,
                    max(max(batches), args.prefill_tokens), max_decode_batch=max(batches))
    copy_gbps = copy_GBps(device, 1 << 28 if device.type == "cuda" else 1 << 22)
    tflops = matmul_TFLOPs(device, 8192 if device.type == "cuda" else 512, torch.float16)
    rows = []
    combos = [(b, c, m) for c in contexts for b in batches for m in mixes]
    for batch, context, mix in tqdm(combos, desc="decode steps", unit="row"):
        if batch * context > kv_tokens:
            rows.append({"kind": "decode", "mix": mix, "batch": batch, "context": context,
                         "skipped": f"KV for {batch} x {context} tokens exceeds the rig's pool"})
            continue
        rows.append(decode_row(rig, batch, context, mix, args.rank, copy_gbps, args.reps))
    seqs = max(1, args.prefill_tokens // 2048)
    rows.append(prefill_row(rig, args.prefill_tokens, seqs, tflops, max(3, args.reps // 4)))
    result = {**run_info("punica bench decode " + " ".join(argv or sys.argv[1:])),
              "arch": args.arch, "rank": args.rank, "copy_GBps": copy_gbps,
              "matmul_TFLOPs": tflops, "attention": rig.attention_backend, "rows": rows}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode.json").write_text(json.dumps(result, indent=1))
    for r in rows:
        if "skipped" in r:
            print(f"{r['kind']:>7} {r['mix']:>9} b={r['batch']:<4} ctx={r['context']:<5} skipped")
        else:
            print(f"{r['kind']:>7} {r['mix']:>9} b={r['batch']:<4} ctx={r['context']:<5} "
                  f"{r['step_ms']:8.2f} ms {r['tok_s']:10.0f} tok/s  "
                  f"floor {r['floor_tok_s']:10.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
