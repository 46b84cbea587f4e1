"""How long reading one adapter file stalls another Python thread (the engine's step thread
stands for it): safetensors' load(bytes) against the GIL-free read (lora/safetensors_buffer.py),
on a rank-16 adapter of every projection of the 7B shape (80 MB). Writes gil_probe_cpu.json.

    python scripts/gil_probe.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load

from punica.bench.timing import run_info
from punica.lora.files import read_file
from punica.lora.peft_writer import save_peft
from punica.lora.safetensors_buffer import parse_safetensors
from punica.models.random import llama2_7b, random_adapter


def worst_gap_ms(fn: Callable[[], object]) -> tuple[float, float]:
    """(ms fn took, the longest ms a thread waking every 0.2 ms went without running)."""
    stop, worst = threading.Event(), [0.0]

    def spin() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            now = time.perf_counter()
            worst[0] = max(worst[0], now - last)
            last = now
            time.sleep(0.0002)

    t = threading.Thread(target=spin)
    t.start()
    time.sleep(0.05)
    start = time.perf_counter()
    fn()
    took = time.perf_counter() - start
    stop.set()
    t.join()
    return took * 1e3, worst[0] * 1e3


def main(out: Path) -> None:
    torch.set_num_threads(1)
    arch = llama2_7b()
    folder = save_peft(random_adapter("x", arch, 16, torch.float16),
                       arch, Path(tempfile.mkdtemp()) / "x")
    path = folder / "adapter_model.safetensors"
    ways = {"safetensors load(bytes)": lambda: load(path.read_bytes()),
            "read_file(as_tensor) + parse_safetensors": lambda: parse_safetensors(
                read_file(folder, path.name, None, as_tensor=True)[0])}
    rows = [{"way": way, "ms": ms, "worst_gap_ms": gap}
            for _ in range(5) for way, fn in ways.items() for ms, gap in [worst_gap_ms(fn)]]
    result = {**run_info("python scripts/gil_probe.py " + str(out)),
              "file_bytes": path.stat().st_size, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "gil_probe_cpu.json").write_text(json.dumps(result, indent=1))
    for r in rows:
        print(f"{r['way']:<42} {r['ms']:7.1f} ms, other thread's worst gap "
              f"{r['worst_gap_ms']:6.1f} ms")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results"))
