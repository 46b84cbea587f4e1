"""`punica serve`: build the engine from flags (vLLM's names), load --lora-modules, run uvicorn."""

from __future__ import annotations

import argparse

from punica.config import CacheConfig, EngineConfig, LoraConfig, ModelConfig
from punica.engine.scheduler import SchedulerConfig


def add_serve_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", help="Hugging Face model directory (default: the built-in demo); "
                    "random:llama2-7b or random:tiny serve random weights (benchmarks)")
    ap.add_argument("--random-adapters", type=int, default=0,
                    help="with --model random:...: register this many random rank-16 adapters "
                    "lora0, lora1, ...")
    ap.add_argument("--served-model-name", help="name of the base model in the API (default: "
                    "the directory's name)")
    ap.add_argument("--lora-modules", nargs="*", default=[], metavar="NAME=DIR",
                    help="PEFT adapters to load at start")
    ap.add_argument("--lora-root", help="folder load_lora_adapter may read below (unset: "
                    "dynamic loading disabled)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1")
    ap.add_argument("--max-in-flight", type=int, default=1024,
                    help="requests in flight before new ones get 503")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-model-len", type=int)
    ap.add_argument("--max-loras", type=int, default=8)
    ap.add_argument("--max-lora-rank", type=int, default=64)
    ap.add_argument("--max-cpu-loras", type=int)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--kv-cache-bytes", type=int, default=256 << 20,
                    help="KV pool size on the CPU")
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    ap.add_argument("--seed", type=int, default=0)


def engine_config(ns: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(ns.model, ns.dtype, ns.device, ns.max_model_len, ns.seed,
                          enforce_eager=ns.enforce_eager),
        cache=CacheConfig(ns.block_size, ns.gpu_memory_utilization, ns.kv_cache_bytes),
        lora=LoraConfig(ns.max_loras, ns.max_lora_rank, ns.max_cpu_loras),
        scheduler=SchedulerConfig(ns.max_num_seqs, ns.max_num_batched_tokens))


def serve(ns: argparse.Namespace) -> int:
    from pathlib import Path

    import uvicorn

    from punica.engine.async_engine import AsyncEngine
    from punica.engine.llm_engine import LLMEngine
    from punica.server.app import create_app
    from punica.server.metrics import Metrics
    from punica.server.state import ServerSettings

    if ns.model is None:
        from punica.demo import SERVED_NAME, ensure_demo

        base, demo_adapters = ensure_demo()
        ns.model = str(base)
        ns.served_model_name = ns.served_model_name or SERVED_NAME
        ns.lora_modules = [f"{n}={p}" for n, p in demo_adapters.items()] + ns.lora_modules
        ns.lora_root = ns.lora_root or str(base.parent / "adapters")
    engine = _random_engine(ns) if ns.model.startswith("random:") else \
        LLMEngine(engine_config(ns))
    for spec in ns.lora_modules:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--lora-modules: expected NAME=DIR, got {spec!r}")
        engine.load_lora(name, path)
    settings = ServerSettings(ns.served_model_name or Path(ns.model).name, ns.api_key,
                              ns.lora_root)
    print(f"punica: serving {settings.served_model_name} with adapters "
          f"{engine.list_loras()} on http://{ns.host}:{ns.port}", flush=True)
    metrics = Metrics(engine)
    async_engine = AsyncEngine(engine, ns.max_in_flight, observer=metrics.observe)
    try:
        uvicorn.run(create_app(async_engine, settings, metrics), host=ns.host, port=ns.port,
                    log_level="warning")
    finally:
        async_engine.shutdown()
    return 0


def _random_engine(ns: argparse.Namespace) -> object:
    """An engine over random weights at a named shape, with random adapters (for benchmarks)."""
    import torch

    from punica.engine.llm_engine import LLMEngine
    from punica.models.random import llama2_7b, random_adapter, random_model, tiny

    shapes = {"random:llama2-7b": llama2_7b, "random:tiny": tiny}
    if ns.model not in shapes:
        raise SystemExit(f"--model: expected a directory or one of {sorted(shapes)}")
    arch = shapes[ns.model]()
    device = torch.device(ns.device if ns.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = engine_config(ns)
    engine = LLMEngine(cfg, model=random_model(arch, torch.float16, device))
    first = random_adapter("lora0", arch, min(16, ns.max_lora_rank))
    for i in range(ns.random_adapters):
        engine.add_lora_weights(random_adapter(f"lora{i}", arch, 16, shared=first))
    return engine
