"""`punica serve`: its flags (vLLM's names), the demo defaults, and uvicorn over one engine (built
by punica.server.engine_spec, as every engine of `punica cluster` is)."""

from __future__ import annotations

import argparse

from punica.config import ModelConfig


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
    ap.add_argument("--num-kv-blocks", type=int, help="exactly this many KV blocks (default: "
                    "what --gpu-memory-utilization or --kv-cache-bytes leaves room for)")
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    ap.add_argument("--decode-split-tokens", type=int,
                    default=ModelConfig("").decode_split_tokens,
                    help="decode steps with a context longer than this split every context "
                    "into runs of about this many tokens, one attention program each (0: never)")
    ap.add_argument("--shrink-beside-gemm", action=argparse.BooleanOptionalAction, default=True,
                    help="run each LoRA shrink on a side stream beside its base GEMM (CUDA "
                    "step graphs)")
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                    help="schedule and launch each step while the previous one still runs "
                    "(requests with penalties run synchronous steps)")
    ap.add_argument("--seed", type=int, default=0)


def apply_demo_defaults(ns: argparse.Namespace) -> None:
    """No --model: serve the built-in demo model and its adapters (built on first use)."""
    if ns.model is not None:
        return
    from punica.demo import SERVED_NAME, ensure_demo

    base, demo_adapters = ensure_demo()
    ns.model = str(base)
    ns.served_model_name = ns.served_model_name or SERVED_NAME
    ns.lora_modules = [f"{n}={p}" for n, p in demo_adapters.items()] + ns.lora_modules
    ns.lora_root = ns.lora_root or str(base.parent / "adapters")


def served_name(ns: argparse.Namespace) -> str:
    from pathlib import Path

    return ns.served_model_name or Path(ns.model).name


def serve(ns: argparse.Namespace) -> int:
    import uvicorn

    from punica.engine.async_engine import AsyncEngine
    from punica.server.app import create_app
    from punica.server.engine_spec import build_engine, spec_from_args
    from punica.server.metrics import Metrics
    from punica.server.state import ServerSettings

    apply_demo_defaults(ns)
    engine = build_engine(spec_from_args(ns))
    settings = ServerSettings(served_name(ns), ns.api_key, ns.lora_root)
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
