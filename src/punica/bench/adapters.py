"""punica bench adapters: S-LoRA's many-adapters setting on one engine (issue 18).

One Poisson trace of text-generation requests (the Punica workload's lengths) is replayed in real
time against an engine whose adapters are PEFT folders on disk, named by the requests and loaded
just in time (`lora_root`): with 5, 100, 1,000, 2,000 distinct adapters on q, k, v, o, each
request's adapter drawn uniformly; S1 gives every adapter one rank, S2 draws each one's rank from
8, 16, 32, 64 (S-LoRA's settings). Each setting's first count is the named baseline of the same
process: `vs_baseline` = throughput ÷ the baseline's (S-LoRA: 0.945 at 2,000 against 5). The
default rate is past the engine's capacity (the offered load, the trace's tokens ÷ its arrival
span, is above the throughput), so the figure is what the engine sustains with that many
adapters, not what the trace asked for.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from punica.bench.timing import run_info
from punica.bench.workloads import request_lengths
from punica.config import CacheConfig, EngineConfig, LoraConfig, ModelConfig
from punica.engine.llm_engine import LLMEngine
from punica.engine.sampling_params import SamplingParams
from punica.engine.scheduler import SchedulerConfig
from punica.lora.peft_writer import save_peft
from punica.models.random import llama2_7b, random_adapter, random_model, tiny
from punica.models.registry import layout_of

SETTINGS = {"s1": None, "s2": (8, 16, 32, 64)}
"""S-LoRA's settings: S1, one rank (--rank) for every adapter; S2, each adapter's rank drawn from
8, 16, 32 and 64."""


def rank_of(k: int, ranks: tuple[int, ...]) -> int:
    """Adapter k's rank: drawn (deterministically) from `ranks`."""
    return ranks[random.Random(k).randrange(len(ranks))]


def write_adapters(arch: object, root: Path, count: int, ranks: tuple[int, ...],
                   targets: tuple[str, ...], dtype: torch.dtype, device: torch.device,
                   distinct: int | None = None) -> float:
    """Folders a0 .. a{count-1} below root (kept from an earlier run when present); seconds.
    With `distinct`, folders past the first `distinct` are links to a{k % distinct} (a disk too
    small for them all): each name is still read, cached and served as its own adapter."""
    start = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    for k in tqdm(range(count), desc=f"writing adapters to {root}", unit="adapter",
                  mininterval=10):
        folder = root / f"a{k}"
        if distinct is not None and k >= distinct:
            if not folder.exists():
                folder.symlink_to(f"a{k % distinct}", target_is_directory=True)
        else:
            rank = rank_of(k, ranks) if len(ranks) > 1 else ranks[0]
            if not _kept(folder, rank, targets, arch):
                save_peft(random_adapter(f"a{k}", arch, rank, dtype, k, targets, device=device),
                          arch, folder)
    return time.perf_counter() - start


def _kept(folder: Path, rank: int, targets: tuple[str, ...], arch: object) -> bool:
    """Whether a folder from an earlier run is this adapter (rank and targets as asked)."""
    try:
        cfg = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return False
    layout = layout_of(arch)
    return (folder / "adapter_model.safetensors").exists() and cfg.get("r") == rank and \
        sorted(cfg.get("target_modules", [])) == sorted(layout.leaf(p) for p in targets)


Lengths = list[tuple[int, int]]


def trace(n: int, rate: float, maxlen: int, seed: int) -> tuple[list[float], Lengths]:
    """Arrival times (Poisson, `rate` per second) and (prompt, output) lengths."""
    rng = random.Random(seed)
    t, arrivals = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        arrivals.append(t)
    return arrivals, request_lengths(n, maxlen, seed)


def replay(engine: LLMEngine, arrivals: list[float], lengths: Lengths,
           names: list[str], vocab: int, label: str) -> dict[str, object]:
    """Add each request at its arrival time while stepping; throughput over the whole run."""
    gen = torch.Generator().manual_seed(0)
    start, i, done, out_tokens = time.perf_counter(), 0, 0, 0
    with tqdm(total=len(arrivals), desc=label, unit="req") as bar:
        while done < len(arrivals):
            now = time.perf_counter() - start
            while i < len(arrivals) and arrivals[i] <= now:
                prompt_len, out_len = lengths[i]
                prompt = torch.randint(1, vocab, (prompt_len,), generator=gen).tolist()
                engine.add_request(f"r{i}", prompt, SamplingParams(
                    max_tokens=out_len, temperature=0.0, ignore_eos=True), names[i])
                i += 1
            if not engine.has_unfinished():
                time.sleep(max(0.0, min(arrivals[i] - now, 0.01)))
                continue
            if engine.waiting_on_reads():
                time.sleep(0.0005)
                continue
            for out in engine.step(updates=False):
                if out.finished:
                    if out.error is not None:
                        raise RuntimeError(f"{out.request_id} failed: {out.error}")
                    done += 1
                    out_tokens += len(out.token_ids)
                    bar.update()
    wall = time.perf_counter() - start
    total = sum(p for p, _ in lengths) + out_tokens
    stats = engine.registry.stats
    return {"wall_s": wall, "tok_s": total / wall, "output_tok_s": out_tokens / wall,
            "offered_tok_s": total / arrivals[-1], "requests": done,
            "disk_reads": stats["disk_loads"], "read_seconds": stats["load_seconds"],
            "host_evictions": stats["host_evictions"],
            "slot_fills": engine.stats["adapter_loads"],
            "slot_evictions": engine.stats["adapter_evictions"],
            "pinned_fallbacks": engine.arena.fallbacks if engine.arena is not None else None}


def run_setting(model: object, arch: object, args: argparse.Namespace, setting: str,
                root: Path, arrivals: list[float], lengths: Lengths,
                rows: list[dict[str, object]], save: Callable[[], None]) -> None:
    """One setting's rows, appended to `rows` (and saved) as each finishes: the trace against
    each adapter count, the first the baseline."""
    device = torch.device(args.device)
    ranks = SETTINGS[setting] or (args.rank,)
    first = len(rows)
    for count in [int(c) for c in args.counts.split(",")]:
        rng = random.Random(args.seed + count)
        names = [f"{setting}/a{rng.randrange(count)}" for _ in arrivals]
        engine = LLMEngine(EngineConfig(
            ModelConfig("<random weights>", device=str(device), max_model_len=args.maxlen),
            CacheConfig(kv_cache_bytes=1 << 30),
            LoraConfig(max_loras=min(args.max_loras, count), max_lora_rank=max(ranks),
                       loader_processes=args.loader_processes,
                       max_cpu_loras=args.max_cpu_loras, lora_root=str(root)),
            SchedulerConfig(max_num_seqs=args.max_num_seqs)), model=model)
        engine.warmup()
        row = {"setting": setting, "adapters": count, "distinct_used": len(set(names)),
               **replay(engine, arrivals, lengths, names, arch.vocab_size,
                        f"{setting}: {count} adapters")}
        row["vs_baseline"] = row["tok_s"] / rows[first]["tok_s"] if len(rows) > first else 1.0
        rows.append(row)
        save()
        del engine
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="punica bench adapters",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=("llama2-7b", "tiny"), default="llama2-7b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--settings", default="s1,s2", help="s1 (one rank), s2 (ranks 8-64)")
    ap.add_argument("--counts", default="5,100,1000,2000")
    ap.add_argument("--rank", type=int, default=8, help="S1's rank")
    ap.add_argument("--targets", default="q,k,v,o")
    ap.add_argument("--s2-folders", type=int, default=200,
                    help="distinct folders of S2 (its other names link to them: a rank-64 "
                         "adapter on q, k, v, o of the 7B shape is 134 MB, and 2,000 of them "
                         "outgrow the device's disk)")
    ap.add_argument("--num-requests", type=int, default=600)
    ap.add_argument("--rate", type=float, default=24.0,
                    help="requests per second (Poisson); past capacity, so that throughput "
                         "is the engine's and not the trace's")
    ap.add_argument("--maxlen", type=int, default=512)
    ap.add_argument("--max-loras", type=int, default=64)
    ap.add_argument("--max-cpu-loras", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--loader-processes", type=int, default=0,
                    help="read adapters in loader processes (LoraConfig.loader_processes)")
    ap.add_argument("--root", help="adapter folders (default: OUT_DIR/adapter_root)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="no run: join these results (one setting each, e.g. from two device "
                         "calls) into OUT_DIR/adapters.json and its plot")
    args = ap.parse_args(argv)
    if args.merge:
        return merge([Path(p) for p in args.merge], Path(args.out_dir))
    device = torch.device(args.device)
    arch = llama2_7b() if args.arch == "llama2-7b" else tiny()
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    settings = args.settings.split(",")
    out = Path(args.out_dir)
    root = Path(args.root) if args.root else out / "adapter_root"
    most = max(int(c) for c in args.counts.split(","))
    targets = tuple(args.targets.split(","))
    write_s = {s: write_adapters(arch, root / s, most, SETTINGS[s] or (args.rank,), targets,
                                 dtype, device, args.s2_folders if s == "s2" else None)
               for s in settings}
    model = random_model(arch, dtype, device)
    arrivals, lengths = trace(args.num_requests, args.rate, args.maxlen, args.seed)
    rows: list[dict[str, object]] = []
    result = {**run_info("punica bench adapters " + " ".join(argv or sys.argv[1:])),
              "arch": args.arch, "rank": args.rank, "targets": args.targets,
              "settings": {s: list(SETTINGS[s] or (args.rank,)) for s in settings},
              "s2_folders": args.s2_folders, "rate": args.rate,
              "num_requests": args.num_requests, "write_s": write_s,
              "baseline": "the setting's first count", "rows": rows}
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every row: a run cut short still leaves what it measured
        (out / "adapters.json").write_text(json.dumps(result, indent=1))

    for s in settings:
        run_setting(model, arch, args, s, root, arrivals, lengths, rows, save)
    plot(result, out / "adapters.png")
    for r in rows:
        print(f"{r['setting']} {r['adapters']:>5} adapters: {r['tok_s']:9.1f} tok/s (offered "
              f"{r['offered_tok_s']:.1f}), {r['vs_baseline']:.3f}x the baseline, "
              f"{r['disk_reads']} reads ({r['read_seconds']:.1f} s on loader threads)")
    return 0


def merge(paths: list[Path], out: Path) -> int:
    """Join results of separate runs (each its own settings, same trace) into one file."""
    parts = [json.loads(p.read_text()) for p in paths]
    result = dict(parts[0])
    for key in ("arch", "rank", "targets", "rate", "num_requests"):
        differ = {json.dumps(p[key]) for p in parts}
        if len(differ) > 1:
            raise SystemExit(f"cannot merge runs whose {key} differ: {sorted(differ)}")
    result["settings"] = {k: v for p in parts for k, v in p["settings"].items()}
    result["write_s"] = {k: v for p in parts for k, v in p["write_s"].items()}
    result["rows"] = [r for p in parts for r in p["rows"]]
    result["runs"] = [{k: p.get(k) for k in ("commit", "command", "device")} for p in parts]
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapters.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "adapters.png")
    return 0


def plot(result: dict, path: Path) -> None:
    """Throughput against the number of adapters, one line per setting, beside the offered
    load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for setting in result["settings"]:
        rows = [r for r in result["rows"] if r["setting"] == setting]
        ax.plot([r["adapters"] for r in rows], [r["tok_s"] for r in rows], marker="o",
                label=f"{setting} (ranks {result['settings'][setting]})")
    ax.axhline(result["rows"][0]["offered_tok_s"], color="gray", ls="--", label="offered")
    ax.set_xscale("log")
    ax.set_xlabel("distinct adapters")
    ax.set_ylabel("tokens / s")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title(f"{result['arch']}, {result['device']}: just-in-time adapters")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
