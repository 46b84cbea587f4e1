"""How much adapter reads slow a thread that stands for the engine's step thread, with the reads
on loader threads of the same process and with them in loader processes (lora/loader_process.py).

The "step" is 300 small torch operations (each gives the GIL away and must get it back, as the
step thread's batch building and launches do); it runs 1,000 times while 0, 1 or 2 loaders read a
rank-16 adapter of every projection of the 7B shape (80 MB) in a loop, from the page cache.
Writes convoy_probe_cpu.json (or _cuda when a GPU is present) with step p50/p99 per setting.

    python scripts/convoy_probe.py OUT_DIR
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

from punica.bench.timing import run_info
from punica.lora.loader_process import ProcessReader
from punica.lora.peft import load_adapter
from punica.lora.peft_writer import save_peft
from punica.lora.pinned_arena import PinnedArena
from punica.models.random import llama2_7b, random_adapter

STEPS, OPS = 1000, 300


def step_ms(x: torch.Tensor) -> float:
    start = time.perf_counter()
    for _ in range(OPS):
        x = x + 1
    return (time.perf_counter() - start) * 1e3


def measure(loaders: int, read: Callable[[], None]) -> dict[str, float]:
    stop, reads = threading.Event(), [0]

    def loop() -> None:
        while not stop.is_set():
            read()
            reads[0] += 1

    threads = [threading.Thread(target=loop) for _ in range(loaders)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # the loaders under way
    x = torch.zeros(16)
    times = sorted(step_ms(x) for _ in range(STEPS))
    stop.set()
    for t in threads:
        t.join()
    return {"loaders": loaders, "p50_ms": times[STEPS // 2], "p99_ms": times[STEPS * 99 // 100],
            "max_ms": times[-1], "reads": reads[0]}


def main(out_dir: str) -> int:
    arch = llama2_7b()
    dtype = torch.float16
    folder = Path(tempfile.mkdtemp()) / "a"
    save_peft(random_adapter("a", arch, 16, dtype, 0), arch, folder)
    arena = PinnedArena(1 << 30, shared=True)
    reader = ProcessReader(2, arena, arch, 16, False, dtype)

    def in_thread() -> None:
        load_adapter("a", folder, arch, 16, dtype=dtype)

    def in_process() -> None:
        weights = reader.load("a", str(folder), None)
        assert weights is not None and weights.blocks is not None
        weights.blocks.release()

    in_process()  # the processes are up
    rows = [{"where": "alone", **measure(0, in_thread)}]
    for n in (1, 2):
        rows.append({"where": "loader threads", **measure(n, in_thread)})
        rows.append({"where": "loader processes", **measure(n, in_process)})
    reader.close()
    result = {**run_info("python scripts/convoy_probe.py"), "steps": STEPS,
              "ops_per_step": OPS, "intra_op_threads": torch.get_num_threads(), "rows": rows}
    name = "convoy_probe_cuda.json" if torch.cuda.is_available() else "convoy_probe_cpu.json"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(result, indent=1))
    for r in rows:
        print(f"{r['where']:<17} {r['loaders']} loaders: step p50 {r['p50_ms']:6.2f} ms  "
              f"p99 {r['p99_ms']:6.2f} ms  max {r['max_ms']:6.2f} ms  ({r['reads']} reads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1] if len(sys.argv) > 1 else "."))
