"""GPU timing helpers shared by the benchmarks: ceilings, eager and CUDA-graph timings, run info."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from collections.abc import Callable

import torch
import triton
import triton.testing


def copy_bandwidth_TBps(numel: int = 1 << 29) -> float:
    """Device-to-device copy rate in TB/s (bytes read + written) of a 1 GiB fp16 buffer."""
    src = torch.randn(numel, device="cuda", dtype=torch.float16)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * numel * 2 / (ms * 1e-3) / 1e12


def eager_us(fn: Callable[[], object]) -> float:
    """Median of event-timed calls with the L2 flushed before each (triton's do_bench)."""
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def graph_us(fns: list[Callable[[], object]], replays: int = 30) -> float:
    """Capture `fns` (one call each, in order) in one CUDA graph; median replay time / len(fns).

    Callers pass calls on rotating inputs whose total size exceeds the L2, so each call starts cold.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(fns))
    del graph
    return sorted(times)[len(times) // 2]


def git_commit() -> str:
    """The commit under test: $PUNICA_COMMIT (set by scripts/gpu_check.sh), else git's HEAD."""
    if os.environ.get("PUNICA_COMMIT"):
        return os.environ["PUNICA_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_info(command: str) -> dict[str, object]:
    """Device, versions, commit, date and command of a benchmark run."""
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.node(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command,
    }
