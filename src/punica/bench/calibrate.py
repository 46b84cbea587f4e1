"""Fixed costs of a kernel pair in a CUDA graph: the floor under any two-launch LoRA op.

Two trivial one-program Triton kernels, the second reading what the first wrote, replayed back to
back in a graph, with and without programmatic dependent launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from punica.bench.timing import graph_us


@triton.jit
def _write_kernel(buf_ptr, USE_PDL: tl.constexpr):
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
    tl.store(buf_ptr + tl.program_id(0), tl.program_id(0).to(tl.float32))


@triton.jit
def _read_kernel(buf_ptr, out_ptr, USE_PDL: tl.constexpr):
    if USE_PDL:
        gdc_wait()
    pid = tl.program_id(0)
    tl.store(out_ptr + pid, tl.load(buf_ptr + pid) + 1.0)


def pair_us(use_pdl: bool, programs: int = 132, calls: int = 64) -> float:
    """Graph time per (write, read) pair of trivial kernels of `programs` programs each."""
    bufs = [torch.zeros(programs, device="cuda") for _ in range(calls)]
    outs = [torch.zeros(programs, device="cuda") for _ in range(calls)]
    opts = {"launch_pdl": True} if use_pdl else {}

    def pair(buf: torch.Tensor, out: torch.Tensor) -> None:
        _write_kernel[(programs,)](buf, USE_PDL=use_pdl, **opts)
        _read_kernel[(programs,)](buf, out, USE_PDL=use_pdl, **opts)

    t = graph_us([lambda b=b, o=o: pair(b, o) for b, o in zip(bufs, outs, strict=True)])
    if not torch.equal(outs[0].cpu(), torch.arange(programs, dtype=torch.float32) + 1):
        raise RuntimeError("calibration pair computed a wrong result")
    return t


def calibrate() -> dict[str, float]:
    return {"pair_graph_us": pair_us(False), "pair_graph_pdl_us": pair_us(True)}


if __name__ == "__main__":
    print(calibrate())
