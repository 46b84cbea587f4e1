"""Host (CPU) time per call of the op wrappers: SGMV shrink / expand / add_lora and paged attention.

    python scripts/host_overhead.py [--calls N] [--repeats 7] [--no-fast-launch]

Shapes of an eager LLaMA-7B decode step at batch 32: T = 32 rows, 4096 -> 11008, 64 adapter slots
of rank 16, 32 distinct adapters; 32 heads of 128, 16-token KV blocks, 512 tokens of context; the
prefill row is 4 sequences x 64 new tokens.

CUDA: real launches; each timed loop queues `calls` launches without a sync (host time only).
CPU: Triton's JIT launcher runs for real on a stand-in driver whose compiled kernel does nothing
(no compilation, no device), so the time is the wrappers' Python plus Triton's own launch path.
The wrappers treat the kernels as interpreted there (`checks.use_interpreter(True)`; they stay
compiled-kernel objects) so that add_lora takes its Triton path on CPU tensors. Each row: median
and best of `repeats` loops, and (CPU) the kernel launches per call. `--no-fast-launch` sends
every launch through `kernel[grid](...)` (punica.ops.launch.FAST_LAUNCH = False) to compare.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import triton
from triton.runtime.jit import JITFunction

from punica.ops import (
    attention,
    attention_kernels,
    checks,
    launch,
    lora,
    lora_kernels,
    lora_row_kernels,
)
from punica.ops.launch_stub import null_kernels, null_launches

CUDA = torch.cuda.is_available()
T, IN, OUT, SLOTS, RANK = 32, 4096, 11008, 64, 16
HEADS, HEAD_DIM, BLOCK, CONTEXT = 32, 128, 16, 512


def _kernels() -> list[JITFunction]:
    mods = (lora_kernels, lora_row_kernels, attention_kernels)
    found = {id(k): k for m in mods for k in vars(m).values() if isinstance(k, JITFunction)}
    return list(found.values())


def launches() -> int:
    return sum(null.launches for k in _kernels() for null in null_kernels(k))


def lora_calls(dev: torch.device) -> dict[str, Callable[[], object]]:
    f16, i32 = dict(dtype=torch.float16, device=dev), dict(dtype=torch.int32, device=dev)
    x, y = torch.randn(T, IN, **f16), torch.zeros(T, OUT, **f16)
    A, B = torch.randn(SLOTS, RANK, IN, **f16), torch.randn(SLOTS, RANK, OUT, **f16)
    indptr, slots = torch.arange(T + 1, **i32), torch.arange(T, **i32)
    ranks = torch.full((SLOTS,), RANK, **i32)
    scales = torch.ones(SLOTS, device=dev)
    workspace = torch.zeros(lora.workspace_numel(T, RANK), device=dev)
    splits = lora.shrink_config(T, T, IN, RANK).num_splits
    v = torch.zeros(splits, T, RANK, device=dev)
    return {
        "sgmv_shrink": lambda: lora.sgmv_shrink(x, A, indptr, slots, ranks, v,
                                                check_values=False),
        "sgmv_expand": lambda: lora.sgmv_expand(v, B, indptr, slots, ranks, scales, y,
                                                check_values=False),
        "add_lora": lambda: lora.add_lora(y, x, A, B, indptr, slots, ranks, scales, workspace,
                                          check_values=False),
    }


def attention_calls(dev: torch.device) -> dict[str, Callable[[], object]]:
    f16, i32 = dict(dtype=torch.float16, device=dev), dict(dtype=torch.int32, device=dev)
    per_seq = CONTEXT // BLOCK
    k_cache = torch.zeros(T * per_seq + 1, BLOCK, HEADS, HEAD_DIM, **f16)
    v_cache = torch.zeros_like(k_cache)
    q, out = torch.randn(T, HEADS, HEAD_DIM, **f16), torch.empty(T, HEADS, HEAD_DIM, **f16)
    k, v = torch.randn(T, HEADS, HEAD_DIM, **f16), torch.randn(T, HEADS, HEAD_DIM, **f16)
    tables = torch.arange(T * per_seq, **i32).view(T, per_seq)
    seq_lens = torch.full((T,), CONTEXT, **i32)
    slot_mapping = (tables[:, -1].long() * BLOCK + BLOCK - 1).contiguous()
    seqs, new = 4, 64
    qp, outp = torch.randn(seqs * new, HEADS, HEAD_DIM, **f16), torch.empty(seqs * new, HEADS,
                                                                             HEAD_DIM, **f16)
    cu = torch.arange(0, seqs * new + 1, new, **i32)
    scale = HEAD_DIM**-0.5
    return {
        "write_kv_cache": lambda: attention.write_kv_cache(k, v, k_cache, v_cache, slot_mapping),
        "paged_decode": lambda: attention.paged_decode(q, k_cache, v_cache, seq_lens, tables,
                                                       scale, out),
        "paged_prefill": lambda: attention.paged_prefill(qp, k_cache, v_cache, cu,
                                                         seq_lens[:seqs], tables[:seqs], scale,
                                                         outp),
    }


def host_us(fn: Callable[[], object], calls: int, repeats: int) -> tuple[float, float]:
    """(median, best) over `repeats` loops of `calls` calls: microseconds of host time per call."""
    for _ in range(20):
        fn()
    times: list[float] = []
    for _ in range(repeats):
        if CUDA:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls * 1e6)
    if CUDA:
        torch.cuda.synchronize()
    return statistics.median(times), min(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000 if not CUDA else 200)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-fast-launch", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda" if CUDA else "cpu")
    if args.no_fast_launch:
        launch.FAST_LAUNCH = False
    if CUDA:
        report(args, dev)
        return 0
    with null_launches(_kernels()), checks.use_interpreter(True):
        report(args, dev)
    return 0


def report(args: argparse.Namespace, dev: torch.device) -> None:
    calls = {**lora_calls(dev), **attention_calls(dev)}
    mode = (f"CUDA launches on {torch.cuda.get_device_name()}" if CUDA
            else "CPU, stand-in launcher (no device work)")
    print(f"host time per call, {mode}; torch {torch.__version__}, triton {triton.__version__}")
    print(f"T={T} in={IN} out={OUT} slots={SLOTS} rank={RANK}; heads={HEADS}x{HEAD_DIM} "
          f"context={CONTEXT}{'; fast launch off' if args.no_fast_launch else ''}")
    print(f"  {'wrapper':16s} {'median':>8s} {'best':>8s}  launches/call")
    for name, fn in calls.items():
        before = 0 if CUDA else launches()
        median, best = host_us(fn, args.calls, args.repeats)
        per_call = "" if CUDA else f"{(launches() - before) / (20 + args.calls * args.repeats):.0f}"
        print(f"  {name:16s} {median:8.1f} {best:8.1f}  {per_call}")


if __name__ == "__main__":
    raise SystemExit(main())
