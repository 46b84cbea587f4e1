"""punica bench adapter-latency: what a cold adapter costs (the issue's two latency targets).

1. Cold start: the extra time to first token of a request whose adapter is only in the host cache
   (<= 10 ms) or only on disk (<= 50 ms), against one whose adapter sits in a GPU slot; rank 16 on
   all seven projections of a 7B model (~80 MB), shown beside the copy floors measured in the run
   (host: bytes / pinned host-to-device bandwidth; disk: + bytes / dropped-cache read bandwidth).
   States: warm (second request of a slot-resident adapter), host (evicted from its slot by
   max_loras others, still cached and staged), host_unstaged (read by a prefetch, never in a slot),
   disk (never read; its files dropped from the page cache with posix_fadvise first).
2. Stall: warm streams decode alone (run "alone"), then again while cold requests for distinct
   adapters on disk arrive at a steady rate over the first half of the run ("with_cold"); the
   warm streams' p99 gap between tokens with them must stay <= 1.2x that without. "with_hot" is
   the same extra requests on the warm streams' resident adapters: the cost of the extra work alone.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from punica.bench.io_floors import drop_cached, h2d_GBps, read_GBps, resident_fraction
from punica.bench.serve import percentiles
from punica.bench.timing import run_info
from punica.config import CacheConfig, EngineConfig, LoraConfig, ModelConfig
from punica.engine.llm_engine import LLMEngine
from punica.engine.sampling_params import SamplingParams
from punica.engine.scheduler import SchedulerConfig
from punica.lora.peft_writer import save_peft
from punica.lora.registry import jit_path
from punica.models.arch import ModelArch
from punica.models.random import llama2_7b, random_adapter, random_model, tiny
from punica.models.registry import layout_of

TARGET_EXTRA_MS = {"host": 10.0, "host_unstaged": 10.0, "disk": 50.0}
TARGET_RATIO = 1.2
POLL_S = 0.0002


def adapter_nbytes(arch: ModelArch, rank: int, dtype: torch.dtype) -> int:
    """Bytes of a rank-`rank` adapter on every projection: sum of (in + out) * rank."""
    layout = layout_of(arch)
    return arch.num_layers * rank * dtype.itemsize * sum(
        sum(layout.shape(arch, p)) for p in layout.projections)


def write_adapters(arch: ModelArch, root: Path, names: list[str], rank: int,
                   dtype: torch.dtype, device: torch.device) -> float:
    """PEFT folders root/NAME (kept from an earlier run when their size fits); seconds."""
    start, nbytes = time.perf_counter(), adapter_nbytes(arch, rank, dtype)
    for k, name in enumerate(tqdm(names, desc=f"writing adapters to {root}",
                                         unit="adapter", mininterval=5)):
        st = root / name / "adapter_model.safetensors"
        if not (st.exists() and nbytes <= st.stat().st_size <= nbytes + (1 << 20)):
            save_peft(random_adapter(name, arch, rank, dtype, k, device=device), arch, root / name)
    return time.perf_counter() - start


def ttft(engine: LLMEngine, rid: str, prompt: list[int], adapter: str) -> float:
    """Seconds from add_request to the step that returns the request's first token (greedy, one
    token); the engine is left idle (the step in flight settled)."""
    start, first = time.perf_counter(), None
    engine.add_request(rid, prompt, SamplingParams(max_tokens=1, temperature=0.0,
                                                   ignore_eos=True), adapter)
    while engine.has_unfinished():
        if engine.waiting_on_reads():
            time.sleep(POLL_S)
            continue
        for out in engine.step():
            if out.error is not None:
                raise RuntimeError(f"{rid} failed: {out.error}")
            if out.request_id == rid and out.token_ids and first is None:
                first = time.perf_counter()
    engine.step()  # settle a step still in flight
    assert first is not None
    return first - start


def engine_of(model: torch.nn.Module, device: torch.device, lora: LoraConfig,
              max_num_seqs: int, max_model_len: int) -> LLMEngine:
    """An engine on the shared random model, its step graphs captured (untimed)."""
    engine = LLMEngine(EngineConfig(
        ModelConfig("<random weights>", device=str(device), max_model_len=max_model_len),
        CacheConfig(), lora, SchedulerConfig(max_num_seqs=max_num_seqs)), model=model)
    engine.warmup()
    return engine


def cold_start(engine: LLMEngine, root: Path, names: list[str], fillers: list[str],
               prompt: list[int], repeats: int) -> tuple[dict[str, list[float]], list[float]]:
    """TTFT (ms) per state, `repeats` adapters each; the page-cache share left after each drop."""
    ttfts: dict[str, list[float]] = {"warm": [], "host": [], "host_unstaged": [], "disk": []}
    resident: list[float] = []
    ids = itertools.count()
    for i in tqdm(range(repeats), desc="cold start", unit="adapter"):
        name, unstaged = names[2 * i], names[2 * i + 1]
        assert name not in engine.registry and unstaged not in engine.registry
        drop_cached(root / name)
        frac = resident_fraction(root / name / "adapter_model.safetensors")
        if frac is not None:
            resident.append(frac)
        ttfts["disk"].append(ttft(engine, f"c{next(ids)}", prompt, name))
        assert name in engine.slots.resident()
        ttfts["warm"].append(ttft(engine, f"c{next(ids)}", prompt, name))
        for f in fillers:  # push `name` out of its slot (least recently used)
            ttft(engine, f"c{next(ids)}", prompt, f)
        if name in engine.slots.resident() or name not in engine.registry.cached():
            raise RuntimeError(f"{name}: expected in the host cache only")
        ttfts["host"].append(ttft(engine, f"c{next(ids)}", prompt, name))
        path = jit_path(str(root), unstaged)
        assert path is not None
        engine.registry.add_lazy(unstaged, str(path), str(root))
        engine.adapter_ready(unstaged)  # a prefetch: read into the host cache, no slot
        while unstaged not in engine.registry.cached():
            engine.waiting_on_reads()  # collects finished reads
            time.sleep(POLL_S)
        assert unstaged not in engine.slots.resident()
        ttfts["host_unstaged"].append(ttft(engine, f"c{next(ids)}", prompt, unstaged))
    return {k: [t * 1e3 for t in v] for k, v in ttfts.items()}, resident


def stream_run(engine: LLMEngine, warm: list[tuple[list[int], str]],
               extra: list[tuple[list[int], str]], window_s: float, max_tokens: int,
               extra_tokens: int) -> dict[str, object]:
    """Warm streams (started at once) plus `extra` requests added evenly over `window_s`; the warm
    streams' gaps between tokens and the extra requests' TTFT, in ms."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    short = SamplingParams(max_tokens=extra_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    for k, (prompt, adapter) in enumerate(warm):
        engine.add_request(f"w{k}", prompt, params, adapter)
    times: dict[str, list[float]] = {f"w{k}": [] for k in range(len(warm))}
    added: dict[str, float] = {}
    due = [window_s * k / max(len(extra), 1) for k in range(len(extra))]
    i = 0
    while i < len(extra) or engine.has_unfinished():
        now = time.perf_counter()
        while i < len(extra) and due[i] <= now - start:
            engine.add_request(f"x{i}", extra[i][0], short, extra[i][1])
            added[f"x{i}"], times[f"x{i}"] = now, []
            i += 1
        if not engine.has_unfinished() or engine.waiting_on_reads():
            time.sleep(POLL_S)
            continue
        outs = engine.step()
        t = time.perf_counter()
        for out in outs:
            if out.error is not None:
                raise RuntimeError(f"{out.request_id} failed: {out.error}")
            got = times[out.request_id]
            got += [t] * (len(out.token_ids) - len(got))
    engine.step()
    wall = time.perf_counter() - start
    gaps = [(b - a) * 1e3 for k in range(len(warm)) for a, b in
            zip(times[f"w{k}"], times[f"w{k}"][1:], strict=False)]
    warm_end = max(times[f"w{k}"][-1] for k in range(len(warm))) - start
    gap_q = percentiles(gaps)
    row: dict[str, object] = {
        "wall_s": wall, "warm_s": warm_end, "warm_tokens": sum(len(times[f"w{k}"])
                                                               for k in range(len(warm))),
        "gaps": len(gaps), "p50_gap_ms": gap_q["p50"], "p99_gap_ms": gap_q["p99"],
        "max_gap_ms": max(gaps), "extra_requests": len(extra)}
    if extra:
        ttfts = [(times[r][0] - added[r]) * 1e3 for r in added]
        row.update(extra_ttft_ms=ttfts, extra_ttft_median_ms=percentiles(ttfts)["p50"],
                   extra_ttft_p99_ms=percentiles(ttfts)["p99"])
    return row


def state_rows(ttfts: dict[str, list[float]], floors: dict[str, float | None]) -> dict:
    """Median and p90 per state; beyond warm, the extra median against warm, target, floor."""
    rows: dict[str, dict[str, object]] = {}
    for state, v in ttfts.items():
        row: dict[str, object] = {"ttft_ms": v, "median_ms": percentiles(v)["p50"],
                                  "p90_ms": percentiles(v)["p90"]}
        if state != "warm":
            extra = percentiles(v)["p50"] - percentiles(ttfts["warm"])["p50"]
            row.update(extra_ms=extra, target_ms=TARGET_EXTRA_MS[state],
                       floor_ms=floors[state.removesuffix("_unstaged")],
                       meets=extra <= TARGET_EXTRA_MS[state])
        rows[state] = row
    return rows


def summary(r: dict) -> str:
    cs, st = r["cold_start"], r["stall"]
    lines = [f"cold start: rank {r['rank']} on all projections, {r['adapter_bytes'] / 1e6:.1f} MB,"
             f" {cs['repeats']} adapters per state"]
    for state, s in cs["states"].items():
        line = f"  {state:<13} TTFT median {s['median_ms']:7.2f} ms  p90 {s['p90_ms']:7.2f} ms"
        if state != "warm":
            floor = "—" if s["floor_ms"] is None else f"{s['floor_ms']:.2f} ms"
            line += (f"  extra {s['extra_ms']:7.2f} ms  target <= {s['target_ms']:.0f} ms  "
                     f"floor {floor}  {'ok' if s['meets'] else 'MISSED'}")
        lines.append(line)
    res = cs["page_cache_resident_after_drop"]
    lines.append(f"  page cache: posix_fadvise {'used' if cs['fadvise'] else 'unavailable'}, "
                 f"resident after drop {'—' if res is None else f'{res:.1%}'}, read "
                 f"{cs['sequential_read_GBps']:.2f} GB/s dropped (in chunks "
                 f"{cs['chunked_read_GBps']:.2f}) vs {cs['cached_read_GBps']:.2f} cached"
                 + ("" if cs["h2d_GBps"] is None else f", H2D {cs['h2d_GBps']:.1f} GB/s")
                 + f"; a loader read took {cs['loader_ms_per_read']:.1f} ms")
    a, c, h = (st["runs"][k] for k in ("alone", "with_cold", "with_hot"))
    lines += [f"stall: {st['warm_streams']} warm streams, {st['cold']} cold adapters over "
              f"{st['window_s']:.2f} s",
              f"  warm p99 gap alone {a['p99_gap_ms']:.2f} ms, with cold {c['p99_gap_ms']:.2f} ms:"
              f" {st['ratio']:.3f}x (target <= {TARGET_RATIO}x) "
              f"{'ok' if st['meets'] else 'MISSED'}; with as many hot requests "
              f"{h['p99_gap_ms']:.2f} ms ({st['ratio_hot']:.3f}x)",
              f"  cold TTFT median {c['extra_ttft_median_ms']:.1f} ms, p99 "
              f"{c['extra_ttft_p99_ms']:.1f} ms; slot fills {c['slot_fills']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="punica bench adapter-latency",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=("llama2-7b", "tiny"), default="llama2-7b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=8, help="adapters per cold-start state")
    ap.add_argument("--max-loras", type=int, default=4, help="slots of the cold-start engine")
    ap.add_argument("--prompt-len", type=int, default=64, help="cold-start and cold requests")
    ap.add_argument("--warm-streams", type=int, default=32)
    ap.add_argument("--cold", type=int, default=100, help="cold adapters of the stall run")
    ap.add_argument("--stall-max-loras", type=int, default=64)
    ap.add_argument("--loader-processes", type=int, default=0,
                    help="read adapters in loader processes (LoraConfig.loader_processes)")
    ap.add_argument("--stream-prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=256, help="tokens per warm stream")
    ap.add_argument("--cold-max-tokens", type=int, default=4)
    ap.add_argument("--root", help="adapter folders (default: OUT_DIR/adapter_latency_root)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default="benchmarks/results")
    args = ap.parse_args(argv)
    if args.stall_max_loras <= args.warm_streams:
        ap.error("--stall-max-loras must exceed --warm-streams (cold adapters need free slots)")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    arch = llama2_7b() if args.arch == "llama2-7b" else tiny()
    dtype = torch.float16 if cuda else torch.float32
    out = Path(args.out_dir)
    root = Path(args.root) if args.root else out / "adapter_latency_root"
    R, L, W = args.repeats, args.max_loras, args.warm_streams
    first_cold = max(2 * R + L, W)
    names = [f"lat{k}" for k in range(first_cold + args.cold)]
    write_s = write_adapters(arch, root, names, args.rank, dtype, device)
    fadvise = all(drop_cached(root / n) for n in names)
    adapter_bytes = adapter_nbytes(arch, args.rank, dtype)
    probe, probe2 = (root / n / "adapter_model.safetensors" for n in names[-2:])
    sequential_rate, cached_rate = read_GBps(probe), read_GBps(probe)
    chunked_rate = read_GBps(probe2, chunked=True)
    read_rate = max(sequential_rate, chunked_rate)  # the floor takes the faster way to read
    for p in (probe, probe2):
        drop_cached(p.parent)
    h2d = h2d_GBps(adapter_bytes) if cuda else None
    host_floor = adapter_bytes / h2d / 1e6 if h2d else None
    disk_floor = (probe.stat().st_size / read_rate / 1e6 + host_floor) if host_floor else None
    model = random_model(arch, dtype, device, seed=args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    def prompt(n: int) -> list[int]:
        return torch.randint(1, arch.vocab_size, (n,), generator=gen).tolist()

    maxlen = min(arch.max_position_embeddings,
                 max(args.prompt_len + args.cold_max_tokens, args.stream_prompt_len +
                     args.max_tokens) + 16)
    engine = engine_of(model, device, LoraConfig(max_loras=L, max_lora_rank=args.rank,
                                                 loader_processes=args.loader_processes,
                                                 max_cpu_loras=2 * R + L + 4,
                                                 lora_root=str(root)), 4, maxlen)
    fillers = names[2 * R: 2 * R + L]
    for k, f in enumerate(fillers):  # read into the host cache now (untimed)
        ttft(engine, f"fill{k}", prompt(args.prompt_len), f)
    ttfts, resident = cold_start(engine, root, names[:2 * R], fillers, prompt(args.prompt_len), R)
    reads = engine.registry.stats
    read_ms = reads["load_seconds"] / max(reads["disk_loads"], 1) * 1e3
    del engine
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    engine = engine_of(model, device, LoraConfig(
        max_loras=args.stall_max_loras, max_lora_rank=args.rank, max_cpu_loras=len(names) + 8,
        lora_root=str(root), loader_processes=args.loader_processes), max(64, 2 * W), maxlen)
    warm = [(prompt(args.stream_prompt_len), names[k]) for k in range(W)]
    stream_run(engine, warm, [], 0.0, min(8, args.max_tokens), 1)  # read and fill the slots
    if not set(names[:W]) <= set(engine.slots.resident()):
        raise RuntimeError("the warm streams' adapters are not all in GPU slots")
    runs = {"alone": stream_run(engine, warm, [], 0.0, args.max_tokens, args.cold_max_tokens)}
    window = runs["alone"]["warm_s"] / 2
    hot = [(prompt(args.prompt_len), names[k % W]) for k in range(args.cold)]
    runs["with_hot"] = stream_run(engine, warm, hot, window, args.max_tokens,
                                  args.cold_max_tokens)
    for n in names[first_cold:]:
        drop_cached(root / n)
    cold = [(p, names[first_cold + k]) for k, (p, _) in enumerate(hot)]
    fills, reads = engine.stats["adapter_loads"], engine.registry.stats["disk_loads"]
    fallbacks = engine.arena.fallbacks if engine.arena is not None else 0
    runs["with_cold"] = stream_run(engine, warm, cold, window, args.max_tokens,
                                   args.cold_max_tokens)
    runs["with_cold"].update(
        slot_fills=engine.stats["adapter_loads"] - fills,
        disk_reads=engine.registry.stats["disk_loads"] - reads,
        pageable_fallbacks=(engine.arena.fallbacks if engine.arena is not None else 0)
        - fallbacks)
    ratio = runs["with_cold"]["p99_gap_ms"] / runs["alone"]["p99_gap_ms"]
    result = {
        **run_info("punica bench adapter-latency " + " ".join(argv or sys.argv[1:])),
        "arch": args.arch, "rank": args.rank, "dtype": str(dtype).removeprefix("torch."),
        "adapter_bytes": adapter_bytes, "file_bytes": probe.stat().st_size, "write_s": write_s,
        "cold_start": {
            "repeats": R, "max_loras": L, "prompt_len": args.prompt_len, "fadvise": fadvise,
            "page_cache_resident_after_drop": max(resident) if resident else None,
            "read_GBps": read_rate, "sequential_read_GBps": sequential_rate,
            "chunked_read_GBps": chunked_rate, "cached_read_GBps": cached_rate, "h2d_GBps": h2d,
            "loader_ms_per_read": read_ms,
            "states": state_rows(ttfts, {"host": host_floor, "disk": disk_floor})},
        "stall": {
            "warm_streams": W, "cold": args.cold, "max_loras": args.stall_max_loras,
            "stream_prompt_len": args.stream_prompt_len, "max_tokens": args.max_tokens,
            "cold_prompt_len": args.prompt_len, "cold_max_tokens": args.cold_max_tokens,
            "window_s": window, "runs": runs, "ratio": ratio,
            "ratio_hot": runs["with_hot"]["p99_gap_ms"] / runs["alone"]["p99_gap_ms"],
            "target_ratio": TARGET_RATIO, "meets": ratio <= TARGET_RATIO}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_latency.json").write_text(json.dumps(result, indent=1))
    print(summary(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
