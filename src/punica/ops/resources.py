"""Registers, spills and shared memory of the kernels an op launches, compiled offline for sm_90.

No GPU is needed: Triton compiles for a target, and the ptxas bundled with Triton reports the
resources of the PTX. The launches go through Triton's own host path (binding and specialisation
of every argument: dtypes, 16-byte alignment, divisibility by 16) under
`launch_stub.null_launches`, whose compile step is replaced here by a real `triton.compile`; so the
binary is the one an H200 would run for that launch, up to the device's own PTX version.

Spills in a bandwidth-bound kernel mean local-memory traffic on every tile; registers per thread
bound how many programs an SM holds (65536 / (registers x threads)).

    python -m punica.ops.resources [--ranks 64] [--batches 1,64] [--mixes distinct] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

from punica.ops import lora_plan
from punica.ops.launch_stub import NullKernel, null_launches
from punica.ops.lora_config import ExpandConfig, ShrinkConfig, workspace_numel
from punica.ops.lora_kernels import sgmv_expand_kernel, sgmv_shrink_kernel
from punica.ops.lora_row_kernels import sgmv_expand_rows_kernel, sgmv_shrink_rows_kernel

SM90 = GPUTarget("cuda", 90, 32)
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@dataclass(frozen=True)
class Resources:
    """What ptxas reports of one compiled kernel (bytes are per thread)."""

    kernel: str
    constexprs: dict[str, object]
    num_warps: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int


def ptxas_report(ptx: str, name: str) -> tuple[int, int, int, int]:
    """(registers, spill store bytes, spill load bytes, stack frame bytes) of `name` in `ptx`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        out = subprocess.run([str(PTXAS), "-v", "-arch=sm_90a", str(path), "-o",
                              str(Path(tmp) / "k.cubin")], capture_output=True, text=True,
                             check=True).stderr
    section = out[out.index(f"'{name}'"):]

    def number(pattern: str) -> int:
        m = re.search(pattern, section)
        return int(m.group(1)) if m else 0

    return (number(r"Used (\d+) registers"), number(r"(\d+) bytes spill stores"),
            number(r"(\d+) bytes spill loads"), number(r"(\d+) bytes stack frame"))


def _compile_and_record(kernel: JITFunction, found: dict[str, Resources]) -> Callable[..., Any]:
    """A `_do_compile` for `kernel`: compile for sm_90, record the resources under Triton's
    cache key, hand Triton a NullKernel (nothing is launched)."""

    def do_compile(key: str, signature: dict[str, str], device: int,
                   constexprs: dict[tuple[int, ...], object], options: Any,
                   attrs: dict[Any, Any], warmup: bool) -> NullKernel:
        src = kernel.ASTSource(kernel, signature, constexprs, attrs)
        compiled = triton.compile(src, target=SM90, options=options.__dict__)
        names = {kernel.arg_names[k[0]]: v for k, v in constexprs.items()
                 if kernel.arg_names[k[0]].isupper()}
        regs, stores, loads, stack = ptxas_report(compiled.asm["ptx"], compiled.metadata.name)
        found[key] = Resources(kernel.__name__, names, compiled.metadata.num_warps, regs, stores,
                               loads, stack, compiled.metadata.shared)
        null = NullKernel(key)
        kernel.device_caches[device][0][key] = null
        return null

    return do_compile


@contextmanager
def sm90_resources(kernels: Iterable[JITFunction]) -> Iterator[dict[str, Resources]]:
    """Within: launches of `kernels` (by `kernel[grid](...)` or `KernelLaunch`, on CPU tensors)
    compile for sm_90 and launch nothing; the yielded dict gains one entry per compiled
    specialisation, in compile order."""
    kernels = list({id(k): k for k in kernels}.values())
    found: dict[str, Resources] = {}
    with null_launches(kernels):  # restores each kernel's _do_compile and empties its cache
        for k in kernels:
            k._do_compile = _compile_and_record(k, found)
        yield found


def add_lora_resources(batch: int, mix: str, rank: int, in_features: int, out_features: int,
                       dtype: torch.dtype, shrink: ShrinkConfig | None = None,
                       expand: ExpandConfig | None = None,
                       slices: tuple[int, ...] = (), beside: bool = False) -> list[Resources]:
    """Resources of the shrink and expand that `add_lora` launches (by default, or with the given
    configs) for `batch` rows of `mix` ("distinct": a segment per row, else one adapter for all)
    at `rank`, planned as on an sm_90 device (PDL on where add_lora asks for it). With `slices`
    (output widths), the sliced call of a fused projection (out_features is then their sum).
    beside: the launches of `add_lora_beside` (the shrink without PDL, the expand reading y
    after its wait)."""
    adapters = batch if mix == "distinct" else 1
    num_slices = len(slices) or 1
    out_features = sum(slices) or out_features
    x, y = torch.zeros(batch, in_features, dtype=dtype), torch.zeros(batch, out_features,
                                                                     dtype=dtype)
    A = torch.zeros(adapters, num_slices * rank, in_features, dtype=dtype)
    B = torch.zeros(adapters, rank, out_features, dtype=dtype)
    i32 = dict(dtype=torch.int32)
    if mix == "distinct":
        indptr, slots = torch.arange(batch + 1, **i32), torch.arange(batch, **i32)
    else:
        indptr, slots = torch.tensor([0, batch], **i32), torch.zeros(1, **i32)
    table = (num_slices, adapters) if slices else (adapters,)
    ranks, scales = torch.full(table, rank, **i32), torch.ones(table)
    workspace = torch.zeros(workspace_numel(batch, rank, num_slices))
    kernels = [sgmv_shrink_rows_kernel, sgmv_expand_rows_kernel, sgmv_shrink_kernel,
               sgmv_expand_kernel]
    with (mock.patch.object(lora_plan, "_use_pdl", lambda flag, device: flag is not False),
          sm90_resources(kernels) as found):
        plan = lora_plan.add_lora_plan(y, x, A, B, indptr, slots, ranks, scales, workspace,
                                       shrink, expand, slices, beside)
        v, v_out, counters = plan.views(workspace)
        s, e = plan.shrink, plan.expand
        assert s.launch is not None and e.launch is not None
        s.launch(x, A, v, indptr, slots, ranks, v_out if s.reduce else v,
                 counters if s.reduce else indptr)
        e.launch(v_out if s.reduce else v, B, y, indptr, slots, ranks, scales)
        return list(found.values())


def paged_decode_resources(batch: int, heads: int, kv_heads: int, head_dim: int, splits: int,
                           merge_in_kernel: bool, dtype: torch.dtype,
                           max_context: int = 2048) -> list[Resources]:
    """Resources of the kernels `paged_decode` launches for `batch` sequences (a split workspace
    of `splits` runs when splits > 1, merged in the kernel or by the reduce kernel)."""
    from punica.ops import attention
    from punica.ops.attention_kernels import decode_reduce_kernel, paged_decode_kernel

    q = torch.zeros(batch, heads, head_dim, dtype=dtype)
    cache = torch.zeros(8, 16, kv_heads, head_dim, dtype=dtype)
    seq_lens = torch.ones(batch, dtype=torch.int32)
    tables = torch.zeros(batch, max_context // 16, dtype=torch.int32)
    workspace = (attention.DecodeWorkspace.allocate(batch, heads, head_dim, splits,
                                                    torch.device("cpu")) if splits > 1 else None)
    with sm90_resources([paged_decode_kernel, decode_reduce_kernel]) as found:
        attention.paged_decode(q, cache, cache, seq_lens, tables, head_dim**-0.5,
                               torch.empty_like(q), max_context=max_context, workspace=workspace,
                               merge_in_kernel=merge_in_kernel)
        return list(found.values())


def main(argv: list[str] | None = None) -> int:
    """python -m punica.ops.resources [--ranks 8,16,32,64,128] [--batches 1,8,32,64,128]
    [--mixes distinct,identical] [--in 4096] [--out 11008] [--json]: a row per (shape, kernel),
    or a JSON object per line. Run without TRITON_INTERPRET=1 (the kernels must be compiled
    JITFunctions, not interpreted ones)."""
    ap = argparse.ArgumentParser(prog="python -m punica.ops.resources",
                                 description="sm_90 resources of add_lora's default launches")
    ap.add_argument("--ranks", default="8,16,32,64,128")
    ap.add_argument("--batches", default="1,8,32,64,128")
    ap.add_argument("--mixes", default="distinct,identical")
    ap.add_argument("--in", dest="in_f", type=int, default=4096)
    ap.add_argument("--out", dest="out_f", type=int, default=11008)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--slices", default="", help="output widths of a sliced call, e.g. "
                    "4096,4096,4096 (fused q/k/v)")
    ap.add_argument("--beside", action="store_true", help="add_lora_beside's launches")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not args.json:
        print(f"{'rank':>4} {'bs':>4} {'mix':>9}  {'kernel':26s} {'warps':>5} {'regs':>4} "
              f"{'spill st/ld':>12} {'stack':>5} {'smem':>6}  constexprs")
    for rank in map(int, args.ranks.split(",")):
        for batch in map(int, args.batches.split(",")):
            for mix in args.mixes.split(","):
                slices = tuple(int(w) for w in args.slices.split(",") if w)
                for r in add_lora_resources(batch, mix, rank, args.in_f, args.out_f,
                                            getattr(torch, args.dtype), slices=slices,
                                            beside=args.beside):
                    if args.json:
                        row = {"rank": rank, "batch": batch, "mix": mix, **asdict(r)}
                        print(json.dumps(row, default=str))
                        continue
                    flags = " ".join(f"{k}={v}" for k, v in r.constexprs.items())
                    print(f"{rank:4d} {batch:4d} {mix:>9}  {r.kernel:26s} {r.num_warps:5d} "
                          f"{r.registers:4d} {r.spill_stores:5d}/{r.spill_loads:<6d} "
                          f"{r.stack:5d} {r.shared:6d}  {flags}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
