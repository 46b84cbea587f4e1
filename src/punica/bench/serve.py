"""Online benchmark of a running server: Poisson arrivals, the Punica workload, an adapter mix.

    punica bench serve --url http://127.0.0.1:8000 [--rate 10 | --rate-ramp 0.5:4]
                       [--num-requests 200] [--mix distinct] [--maxlen 2048] [--api-key KEY]

Requests use token-id prompts (lengths from the Punica workload) and stream; TTFT, TPOT and
end-to-end latency percentiles, throughput, failed requests by HTTP status (with one sample
message; an error event inside a stream counts under its code, a stream that ends short of its
max_tokens under 0) and each request's latencies go to serve.json, their distributions to serve.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
from tqdm import tqdm

from punica.bench.timing import run_info
from punica.bench.workloads import adapter_of_requests, request_lengths


async def one(client: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int,
              headers: dict[str, str]) -> dict[str, float]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = None
    tokens, max_gap = 0, 0.0
    async with client.stream("POST", "/v1/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            body = (await r.aread()).decode(errors="replace")
            return {"error": float(r.status_code), "message": body[:300]}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:  # failed in the stream (the status was sent already)
                return {"error": float(chunk["error"].get("code") or 500),
                        "message": str(chunk["error"].get("message"))[:300]}
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk.get("choices"):
                now = time.perf_counter()
                first = first or now
                max_gap = max(max_gap, now - (last or now))
                last = now
    end = time.perf_counter()
    if tokens != max_tokens:  # ignore_eos: a whole answer has exactly max_tokens tokens
        return {"error": 0.0, "message": f"{tokens} tokens, expected {max_tokens}"}
    ttft = (first or end) - start
    return {"ttft": ttft, "e2e": end - start, "tokens": tokens, "prompt": len(prompt),
            "tpot": (end - (first or end)) / max(tokens - 1, 1), "max_gap": max_gap}


def interarrival_rates(args: argparse.Namespace) -> list[float]:
    """Request i's arrival rate (req/s; 0: all at once): --rate, or --rate-ramp R0:R1 rising
    linearly from R0 at the first request to R1 at the last."""
    n = args.num_requests
    if not args.rate_ramp:
        return [args.rate] * n
    try:
        r0, r1 = (float(v) for v in args.rate_ramp.split(":"))
    except ValueError:
        raise SystemExit(f"--rate-ramp: expected R0:R1, got {args.rate_ramp!r}") from None
    if r0 <= 0 or r1 <= 0:
        raise SystemExit(f"--rate-ramp: rates must be > 0, got {args.rate_ramp!r}")
    return [r0 + (r1 - r0) * i / max(n - 1, 1) for i in range(n)]


PER_REQUEST = ("arrival", "adapter", "prompt", "tokens", "ttft", "tpot", "e2e", "max_gap")
"""Recorded for each request that succeeded (times in seconds; arrival from the run's start)."""


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else \
        [values[0]] * 99
    return {"p50": q[49], "p90": q[89], "p99": q[98], "mean": statistics.fmean(values)}


async def run(args: argparse.Namespace) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.url, timeout=600,
                                 limits=httpx.Limits(max_connections=1024)) as client:
        models = (await client.get("/v1/models", headers=headers)).json()["data"]
        adapters = [m["id"] for m in models if m.get("parent")] or [models[0]["id"]]
        lengths = request_lengths(args.num_requests, args.maxlen, seed=args.seed)
        ids = adapter_of_requests(args.mix, args.num_requests)
        rng = random.Random(args.seed)
        order = list(range(args.num_requests))
        rng.shuffle(order)
        rates = interarrival_rates(args)
        tasks, sent = [], []
        bar = tqdm(total=args.num_requests, desc=f"bench serve {args.mix}", unit="req")
        start, start_unix = time.perf_counter(), time.time()
        for i, rate in zip(order, rates, strict=True):
            prompt = [rng.randrange(1, args.vocab) for _ in range(lengths[i][0])]
            model = adapters[ids[i] % len(adapters)]
            sent.append({"arrival": time.perf_counter() - start,
                         "adapter": ids[i] % len(adapters)})
            task = asyncio.create_task(one(client, model, prompt, lengths[i][1], headers))
            task.add_done_callback(lambda _: bar.update())
            tasks.append(task)
            if rate > 0:
                await asyncio.sleep(rng.expovariate(rate))
        results = [{**r, **s} for r, s in zip(await asyncio.gather(*tasks), sent,
                                              strict=True)]
        wall = time.perf_counter() - start
        bar.close()
    ok = [r for r in results if "error" not in r]
    failed = [r for r in results if "error" in r]
    out_tokens = sum(r["tokens"] for r in ok)
    return {"mix": args.mix, "rate": args.rate, "rate_ramp": args.rate_ramp,
            "start_unix": start_unix,
            "requests": len(results), "ok": len(ok),
            "errors": dict(Counter(str(int(r["error"])) for r in failed)),
            "error_sample": failed[0]["message"] if failed else None,
            "adapters_used": len({ids[i] % len(adapters) for i in range(len(ids))}),
            "wall_s": wall, "tok_s": (out_tokens + sum(r["prompt"] for r in ok)) / wall,
            "output_tok_s": out_tokens / wall,
            "ttft_s": percentiles([r["ttft"] for r in ok]),
            "tpot_s": percentiles([r["tpot"] for r in ok if r["tokens"] > 1]),
            "e2e_s": percentiles([r["e2e"] for r in ok]),
            "per_request": [{k: r[k] for k in PER_REQUEST} for r in ok]}


def plot(summary: dict, path: Path) -> None:
    """serve.png: distributions of time to first token and time per output token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["per_request"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "ttft", "time to first token (ms)"),
                           (axes[1], "tpot", "time per output token (ms)")):
        values = sorted(r[key] * 1e3 for r in rows if key != "tpot" or r["tokens"] > 1)
        ax.plot(values, [(i + 1) / len(values) for i in range(len(values))])
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    rate = summary['rate_ramp'] or f"{summary['rate']:g}"
    fig.suptitle(f"bench serve: {summary['mix']}, {rate} req/s, "
                 f"{summary['ok']}/{summary['requests']} ok, "
                 f"{summary['output_tok_s']:.0f} output tok/s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="punica bench serve", description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--api-key")
    ap.add_argument("--rate", type=float, default=10.0, help="requests/s (0: all at once)")
    ap.add_argument("--rate-ramp", metavar="R0:R1", help="arrival rate rising linearly from "
                    "R0 to R1 req/s over the requests (instead of --rate)")
    ap.add_argument("--num-requests", type=int, default=200)
    ap.add_argument("--mix", default="distinct",
                    choices=("distinct", "uniform", "skewed", "identical"))
    ap.add_argument("--maxlen", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000, help="token ids are drawn below this")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default="benchmarks/results")
    args = ap.parse_args(argv)
    summary = asyncio.run(run(args))
    result = {**run_info("punica bench serve " + " ".join(argv or sys.argv[1:])), **summary}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve.json").write_text(json.dumps(result, indent=1))
    if summary["per_request"]:
        plot(summary, out / "serve.png")
    print(json.dumps({k: v for k, v in summary.items() if k != "per_request"}, indent=1))
    return 0 if summary["ok"] == summary["requests"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
