"""punica bench fairness: one tenant floods, another behaves (issue 19; the VTC paper's setting).

Tenant "a" sends at `--rate` requests per second, tenant "b" at `--flood` times that, each on its
own adapter (so the default tenant, the adapter, tells them apart), Poisson arrivals and the
Punica workload's lengths, replayed in real time against one engine. Runs, in one process on
one model: "a" alone (its baseline), then both tenants under fcfs and under fair. Reported per
run and tenant: TTFT p50/p90, tokens per second over the tenant's own span (its first arrival to
its last finish); the total throughput; and while both tenants are
backlogged, how far their service drifts apart: the largest change of W_a - W_b over any interval
of a backlogged period, W the tokens computed weighted as the fair policy counts them (prompt 1,
generated 2, recomputation not counted, as the policy counts it), beside 2 x the largest
request's weighted tokens (`bound`); a tenant is backlogged while it has requests queued.
Targets: under fair,
a's TTFT and throughput within 1.5x of alone, the drift under the bound, the total within 3% of
fcfs.
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

from punica.bench.serve import percentiles
from punica.bench.timing import run_info
from punica.bench.workloads import request_lengths
from punica.config import CacheConfig, EngineConfig, LoraConfig, ModelConfig
from punica.engine.llm_engine import LLMEngine
from punica.engine.policy import Fair
from punica.engine.sampling_params import SamplingParams
from punica.engine.scheduler import SchedulerConfig
from punica.models.random import llama2_7b, random_adapter, random_model, tiny

Request = tuple[float, str, int, int]
"""(arrival s, tenant, prompt tokens, output tokens)"""


def trace(n_a: int, rate: float, flood: float, maxlen: int, seed: int) -> list[Request]:
    """a's n_a requests at `rate`/s and, over the same span, b's at `flood` x `rate`."""
    rng = random.Random(seed)
    out: list[Request] = []
    t = 0.0
    for p, o in request_lengths(n_a, maxlen, seed):
        t += rng.expovariate(rate)
        out.append((t, "a", p, o))
    span, t = t, 0.0
    b_lengths = request_lengths(int(n_a * flood * 2) + 16, maxlen, seed + 1)
    for p, o in b_lengths:
        t += rng.expovariate(rate * flood)
        if t > span:
            break
        out.append((t, "b", p, o))
    return sorted(out)


def weighted(service: dict[tuple[str, str], int], tenant: str) -> float:
    """A tenant's service weighted as the fair policy's defaults count it."""
    return service.get((tenant, "prompt"), 0) * Fair.prefill_weight + \
        service.get((tenant, "generated"), 0) * Fair.decode_weight


def replay(engine: LLMEngine, reqs: list[Request], vocab: int, label: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    tenant_of, arrival, first, finish, tokens = {}, {}, {}, {}, {}
    lo: float | None = None  # min and max of W_a - W_b in the current backlogged period
    hi: float | None = None
    drift = 0.0
    start, i, done = time.perf_counter(), 0, 0
    while done < len(reqs):
        now = time.perf_counter() - start
        while i < len(reqs) and reqs[i][0] <= now:
            t, tenant, p, o = reqs[i]
            rid = f"{tenant}{i}"
            prompt = torch.randint(1, vocab, (p,), generator=gen).tolist()
            engine.add_request(rid, prompt, SamplingParams(max_tokens=o, temperature=0.0,
                                                           ignore_eos=True), tenant)
            tenant_of[rid], arrival[rid], tokens[rid] = tenant, t, p + o
            i += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, min(reqs[i][0] - now, 0.01)) if i < len(reqs) else 0)
            continue
        for out in engine.step():
            if out.request_id not in first and out.outputs and out.outputs[0].token_ids:
                first[out.request_id] = time.perf_counter() - start
            if out.finished:
                if out.error is not None:
                    raise RuntimeError(f"{out.request_id} failed: {out.error}")
                finish[out.request_id] = time.perf_counter() - start
                done += 1
        sched = engine.scheduler
        queued = {s.tenant for s in sched.waiting}
        if {"a", "b"} <= queued:  # both backlogged (requests queued): W_a - W_b's drift
            service = dict(sched.service)
            d = weighted(service, "a") - weighted(service, "b")
            lo = d if lo is None else min(lo, d)
            hi = d if hi is None else max(hi, d)
            drift = max(drift, hi - lo)
        else:
            lo = hi = None
    wall = time.perf_counter() - start
    row: dict = {"run": label, "wall_s": wall,
                 "tok_s": sum(tokens.values()) / wall, "drift": drift}
    for tenant in sorted(set(tenant_of.values())):
        rids = [r for r in tenant_of if tenant_of[r] == tenant]
        ttft = [first[r] - arrival[r] for r in rids if r in first]
        span = max(finish[r] for r in rids) - min(arrival[r] for r in rids)
        row[tenant] = {"requests": len(rids), "span_s": span,
                       "tok_s": sum(tokens[r] for r in rids) / span,
                       "ttft_s": percentiles(ttft)}
    return row


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    arch = llama2_7b() if args.arch == "llama2-7b" else tiny()
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = random_model(arch, dtype, device)
    rows = []
    plans = [("warm-up", "fcfs"), ("a alone", "fcfs"), ("fcfs", "fcfs"), ("fair", "fair")]
    both = trace(args.num_requests, args.rate, args.flood, args.maxlen, args.seed)
    for label, policy in plans:  # (the warm-up's row, first kernels compiled, is dropped)
        reqs = {"warm-up": both[:16], "a alone": [r for r in both if r[1] == "a"]}.get(
            label, both)
        engine = LLMEngine(EngineConfig(
            ModelConfig("<random weights>", device=str(device), max_model_len=args.maxlen),
            CacheConfig(kv_cache_bytes=args.kv_cache_bytes),
            LoraConfig(max_loras=2, max_lora_rank=args.rank),
            SchedulerConfig(max_num_seqs=args.max_num_seqs, policy=policy)), model=model)
        for k, tenant in enumerate(("a", "b")):
            engine.registry.add_weights(random_adapter(tenant, arch, args.rank, dtype, k))
        engine.warmup()
        rows.append(replay(engine, reqs, arch.vocab_size, label))
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    bound = 2 * max(p + 2 * o for _, _, p, o in both)
    alone, fcfs, fair = rows[1:]
    checks = {
        "a_ttft_p90_vs_alone": fair["a"]["ttft_s"]["p90"] / alone["a"]["ttft_s"]["p90"],
        "a_tok_s_vs_alone": fair["a"]["tok_s"] / alone["a"]["tok_s"],
        "drift_vs_bound": fair["drift"] / bound,
        "total_vs_fcfs": fair["tok_s"] / fcfs["tok_s"],
        "fcfs_a_ttft_p90_vs_alone": fcfs["a"]["ttft_s"]["p90"] / alone["a"]["ttft_s"]["p90"],
    }
    return {"rows": rows[1:], "bound": bound, "checks": checks,
            "meets": {"a_ttft": checks["a_ttft_p90_vs_alone"] <= 1.5,
                      "a_throughput": checks["a_tok_s_vs_alone"] >= 1 / 1.5,
                      "drift": checks["drift_vs_bound"] <= 1.0,
                      "total": checks["total_vs_fcfs"] >= 0.97}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="punica bench fairness",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=("llama2-7b", "tiny"), default="llama2-7b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--num-requests", type=int, default=200, help="tenant a's requests")
    ap.add_argument("--rate", type=float, default=2.0, help="tenant a's requests per second")
    ap.add_argument("--flood", type=float, default=8.0, help="tenant b's rate / a's")
    ap.add_argument("--maxlen", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--kv-cache-bytes", type=int, default=1 << 30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default="benchmarks/results")
    args = ap.parse_args(argv)
    result = {**run_info("punica bench fairness " + " ".join(argv or sys.argv[1:])),
              "arch": args.arch, "rate": args.rate, "flood": args.flood,
              "num_requests": args.num_requests, "max_num_seqs": args.max_num_seqs,
              **run(args)}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fairness.json").write_text(json.dumps(result, indent=1))
    for r in result["rows"]:
        parts = [f"{r['run']:<8} total {r['tok_s']:8.1f} tok/s  drift {r['drift']:8.0f}"]
        for t in ("a", "b"):
            if t in r:
                q = r[t]["ttft_s"]
                parts.append(f"{t}: {r[t]['tok_s']:7.1f} tok/s TTFT p50 {q['p50']:.3f} s "
                             f"p90 {q['p90']:.3f} s")
        print("  ".join(parts))
    print(f"bound {result['bound']}; checks {result['checks']}; meets {result['meets']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
