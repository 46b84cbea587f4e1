"""Decode attention on the context mixes of real text-generation steps, split over the KV length
or not (diagnostics: why textgen steps run slower than uniform-context decode steps).

    python scripts/decode_split_probe.py OUT_DIR [--arch llama2-7b]
        # prints a table, writes OUT_DIR/decode_split_probe.json

Cases: 32 sequences of 512 and of 2048 tokens (the decode benchmark's), and the contexts of
steps of `punica bench textgen`'s schedule at cap 32 (100 and 1,000 requests, maxlen 2048;
replayed by punica.bench.textgen_floor without a model), where lengths differ. Variants of
`paged_decode` at LLaMA-2-7B's attention shape (fp16, 16-token blocks over shuffled blocks):
`unsplit` (the engine's launch so far: one program per sequence and KV head), `reduce/4` (4
splits merged by a second kernel) and `merge/N` (splits of N tokens merged in the kernel).
Each is timed in a CUDA graph of 32 calls (one step's layers), and checked against `unsplit`
after the replays (the in-kernel merge's counters must be back at 0). Floor: the KV bytes of
the contexts ÷ the copy bandwidth measured in the run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from punica.bench.textgen_floor import replay
from punica.bench.timing import copy_bandwidth_TBps, graph_us, run_info
from punica.bench.workloads import adapter_of_requests, request_lengths
from punica.engine.scheduler import SchedulerConfig
from punica.ops import attention as attn

HEADS, HEAD_DIM, BLOCK = 32, 128, 16
MAXLEN = 2048
LAYERS = 32


def textgen_steps(num_requests: int, first: int, last: int, count: int) -> list[list[int]]:
    """Contexts of `count` decode steps evenly spread over steps first..last of the cap-32
    Distinct schedule (last < 0: counted from the end)."""
    requests = request_lengths(num_requests, MAXLEN, seed=0)
    names = [f"a{i}" for i in adapter_of_requests("distinct", num_requests)]
    steps: list[list[int]] = []
    replay(requests, names, SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=8192),
           min(256, num_requests), on_step=steps.append)
    last = last if last >= 0 else len(steps) + last
    picked = [steps[first + (last - first) * i // max(1, count - 1)] for i in range(count)]
    return [c for c in picked if len(c) == 32]


def make_cache(contexts: list[int], gen: torch.Generator) -> dict[str, torch.Tensor]:
    blocks = [-(-c // BLOCK) for c in contexts]
    num_blocks = sum(blocks)
    order = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    tables = torch.zeros(len(contexts), max(blocks), dtype=torch.int32)
    at = 0
    for b, n in enumerate(blocks):
        tables[b, :n] = order[at:at + n]
        at += n
    shape = (num_blocks, BLOCK, HEADS, HEAD_DIM)
    return dict(k=torch.randn(shape, dtype=torch.float16, device="cuda"),
                v=torch.randn(shape, dtype=torch.float16, device="cuda"),
                q=torch.randn(len(contexts), HEADS, HEAD_DIM, dtype=torch.float16, device="cuda"),
                seq_lens=torch.tensor(contexts, dtype=torch.int32, device="cuda"),
                tables=tables.cuda())


def variants() -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {"unsplit": dict(splits=1, merge_in_kernel=True),
                                         "reduce/4": dict(splits=4, merge_in_kernel=False)}
    for chunk in (256, 512, 1024):
        out[f"merge/{chunk}"] = dict(splits=MAXLEN // chunk, merge_in_kernel=True)
    return out


def run_case(name: str, contexts: list[int], copy_tbps: float, gen: torch.Generator) -> list[dict]:
    c = make_cache(contexts, gen)
    scale = HEAD_DIM**-0.5
    kv_bytes = sum(contexts) * HEADS * HEAD_DIM * 2 * 2
    floor_us = kv_bytes / (copy_tbps * 1e12) * 1e6
    want = None
    rows = []
    for label, v in variants().items():
        splits = int(v["splits"])
        ws = attn.DecodeWorkspace.allocate(len(contexts), HEADS, HEAD_DIM, splits,
                                           torch.device("cuda")) if splits > 1 else None
        out = torch.empty_like(c["q"])

        def call(ws=ws, out=out, merge=bool(v["merge_in_kernel"])) -> None:
            attn.paged_decode(c["q"], c["k"], c["v"], c["seq_lens"], c["tables"], scale, out,
                              max_context=MAXLEN, workspace=ws, merge_in_kernel=merge)

        us = graph_us([call] * LAYERS)
        out.fill_(float("nan"))
        call()
        torch.cuda.synchronize()
        if want is None:
            want = out.float().clone()
        err = float((out.float() - want).abs().max() / want.abs().max())
        dirty = int(ws.counters.abs().sum()) if ws is not None else 0
        rows.append(dict(case=name, variant=label, num_seqs=len(contexts),
                         sum_ctx=sum(contexts), max_ctx=max(contexts), us=us, floor_us=floor_us,
                         share_of_floor=floor_us / us, step_ms=us * LAYERS / 1e3,
                         rel_err_vs_unsplit=err, dirty_counters=dirty))
        r = rows[-1]
        print(f"{name:>16} {label:>10}  sum {r['sum_ctx']:6d} max {r['max_ctx']:5d}  "
              f"{us:8.2f} us  floor {floor_us:7.2f} ({100 * r['share_of_floor']:3.0f}%)  "
              f"x{LAYERS} {r['step_ms']:.3f} ms  err {err:.1e}  dirty {dirty}", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    copy_tbps = copy_bandwidth_TBps()
    print(f"copy bandwidth {copy_tbps:.3f} TB/s")
    cases = [("uniform 512", [512] * 32), ("uniform 2048", [2048] * 32)]
    cases += [(f"textgen100 #{i}", c) for i, c in enumerate(textgen_steps(100, 300, 700, 3))]
    cases += [(f"textgen1000 #{i}", c)
              for i, c in enumerate(textgen_steps(1000, 1000, -1000, 6))]
    rows = []
    for name, contexts in cases:
        rows += run_case(name, contexts, copy_tbps, gen)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_split_probe.json").write_text(json.dumps(
        {**run_info("python scripts/decode_split_probe.py"), "copy_TBps": copy_tbps,
         "rows": rows}, indent=1))
    bad = [r for r in rows if r["rel_err_vs_unsplit"] > 1e-2 or r["dirty_counters"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
