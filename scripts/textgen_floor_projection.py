"""The textgen floor at other request counts, without a GPU: the engine's scheduler replayed over
the Punica workload (punica.bench.textgen_floor) at the 7B shape, rank 16, with the KV pool and the
copy bandwidth of a recorded textgen run, beside the issue's targets.

    python scripts/textgen_floor_projection.py [--from benchmarks/results/textgen_async.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from punica.bench import textgen_floor
from punica.bench.rig import adapter_bytes, kv_bytes_per_token, weight_bytes
from punica.bench.timing import run_info
from punica.bench.workloads import adapter_of_requests, request_lengths
from punica.engine.scheduler import SchedulerConfig
from punica.models.llama import CausalLM
from punica.models.random import llama2_7b

TARGETS = {32: 3500.0, 0: 6000.0}
"""Issue 4's Distinct targets (tok/s) per batch cap (0: uncapped)."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--from", dest="source", default="benchmarks/results/textgen_async.json")
    ap.add_argument("--requests", default="100,400,1000")
    ap.add_argument("--max-loras", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/results/textgen_floor_projection.json")
    args = ap.parse_args()
    run = json.loads(Path(args.source).read_text())
    arch, elem = llama2_7b(), 2
    with torch.device("meta"):  # shapes only: fp16 bytes of every weight
        weights = weight_bytes(CausalLM(arch).to(torch.float16))
    per_adapter, per_token = adapter_bytes(arch, 16, elem), kv_bytes_per_token(arch, elem)
    rows = []
    for n in (int(v) for v in args.requests.split(",")):
        requests = request_lengths(n, run["maxlen"], seed=0)
        names = [f"a{i}" for i in adapter_of_requests("distinct", n)]
        for cap in TARGETS:
            pool = next(r["kv_pool_gib"] for r in run["rows"] if r.get("cap") == cap)
            blocks = int(pool * 2**30) // (16 * per_token)
            config = SchedulerConfig(max_num_seqs=cap or 512, max_num_batched_tokens=8192,
                                     async_scheduling=False)
            r = textgen_floor.replay(requests, names, config, min(args.max_loras, n), blocks)
            floor = r.tokens / textgen_floor.floor_s(r, weights, per_adapter, per_token,
                                                     run["copy_GBps"])
            rows.append({"num_requests": n, "cap": cap, "steps": r.steps,
                         "tokens_per_step": r.tokens / r.steps, "floor_tok_s": floor,
                         "target_tok_s": TARGETS[cap],
                         "target_share_of_floor": TARGETS[cap] / floor})
            print(json.dumps(rows[-1]), flush=True)
    body = {**run_info("python scripts/textgen_floor_projection.py"), "source": args.source,
            "copy_GBps": run["copy_GBps"], "weight_bytes": weights,
            "adapter_bytes": per_adapter, "kv_bytes_per_token": per_token, "rows": rows}
    Path(args.out).write_text(json.dumps(body, indent=1))


if __name__ == "__main__":
    main()
