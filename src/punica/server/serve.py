"""`punica serve`: its flags (vLLM's names), the demo defaults, and uvicorn over one engine (built
by punica.server.engine_spec, as every engine of `punica cluster` is)."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from pathlib import Path

from punica.config import LoraConfig, ModelConfig
from punica.engine.policy import POLICIES
from punica.errors import ConfigError

log = logging.getLogger("punica.server")


def port_number(text: str) -> int:
    """argparse type: a TCP port, 0-65535."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}")
    return port


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
    ap.add_argument("--lora-root", help="folder of adapters: a request whose model names a "
                    "folder below it (org/name allowed) loads it on first use, and "
                    "load_lora_adapter may read below it (unset: both disabled)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=port_number, default=8000)
    ap.add_argument("--api-key", help="require `Authorization: Bearer KEY` on every path but "
                    "/health (visible in the process list: prefer PUNICA_API_KEY or "
                    "--api-key-file)")
    ap.add_argument("--api-key-file", help="read the API key from this file's first line")
    ap.add_argument("--max-in-flight", type=int, default=1024,
                    help="sequences in flight (a request counts n) before new ones get 503")
    ap.add_argument("--max-n", type=int, default=16, help="most completions (n) per request")
    ap.add_argument("--max-prompts", type=int, default=64,
                    help="most prompts in one completions request")
    ap.add_argument("--max-request-bytes", type=int, default=8 << 20,
                    help="largest request body (413 above it)")
    ap.add_argument("--max-connections", type=int, default=4096,
                    help="open connections before new ones get 503 (slow clients hold one)")
    ap.add_argument("--log-level", default="info",
                    choices=["debug", "info", "warning", "error"])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-model-len", type=int)
    ap.add_argument("--max-loras", type=int, default=8)
    ap.add_argument("--max-lora-rank", type=int, default=64)
    ap.add_argument("--max-cpu-loras", type=int, help="adapters kept parsed in host memory")
    ap.add_argument("--max-cpu-lora-bytes", type=int,
                    help="host memory the parsed adapters may take (default: no byte bound)")
    ap.add_argument("--pinned-lora-bytes", type=int,
                    help="pinned host memory for adapters on CUDA, allocated at start (default "
                         "--max-cpu-lora-bytes, else 4 GiB; then also the host cache's bound)")
    ap.add_argument("--lora-loader-threads", type=int, default=LoraConfig.loader_threads,
                    help="threads reading adapter files off the step thread (0: on it)")
    ap.add_argument("--lora-loader-processes", type=int, default=LoraConfig.loader_processes,
                    help="read adapters in this many processes (each loader thread waits on "
                         "one), off the engine process's GIL (0: on the loader threads)")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--scheduling-policy", choices=POLICIES, default="fcfs",
                    help="who is admitted (and preempted) first: fcfs; priority (a request's "
                         "`priority`, lower first); fair (the least-served tenant, by weighted "
                         "tokens: the Virtual Token Counter)")
    ap.add_argument("--tenant-from", choices=("adapter", "user"), default="adapter",
                    help="fair: whose service a request counts as: its adapter (the base model "
                         "is one tenant) or its `user` field (absent: one anonymous tenant)")
    ap.add_argument("--tenant-max-in-flight", type=int, metavar="N",
                    help="most sequences one tenant may have in flight (429 past it)")
    ap.add_argument("--tenant-tokens-per-minute", type=int, metavar="N",
                    help="most tokens (prompt + max_tokens per completion) one tenant may be "
                         "admitted per minute (429 with Retry-After past it)")
    ap.add_argument("--tenant-weights", metavar="FILE",
                    help="fair: JSON object of tenant -> weight (default 1; weight 2 gets "
                         "twice the service when both are backlogged)")
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
    return ns.served_model_name or Path(ns.model).name


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def api_key(ns: argparse.Namespace) -> str | None:
    """--api-key, else --api-key-file's first line, else PUNICA_API_KEY (None: no key)."""
    if ns.api_key:
        return ns.api_key
    if ns.api_key_file:
        try:
            key = Path(ns.api_key_file).read_text().splitlines()[0].strip()
        except (OSError, IndexError, UnicodeDecodeError) as err:
            raise ConfigError(f"--api-key-file: cannot read a key from "
                             f"{ns.api_key_file} ({type(err).__name__})") from err
        if not key:
            raise ConfigError("--api-key-file: the first line is empty")
        return key
    return os.environ.get("PUNICA_API_KEY") or None


def check_names(ns: argparse.Namespace) -> None:
    """--lora-modules names: valid adapter names, none the base model's (ConfigError)."""
    from punica.server.protocol import valid_adapter_name

    base = served_name(ns)
    for entry in ns.lora_modules:
        name = entry.partition("=")[0]
        try:
            valid_adapter_name(name)
        except ValueError as err:
            raise ConfigError(f"--lora-modules {name!r}: {err}") from err
        if name == base:
            raise ConfigError(f"--lora-modules: {name!r} is the base model's "
                             "name")


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a port in use fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({err.strerror})") \
            from err
    sock.set_inheritable(True)
    return sock


def serve(ns: argparse.Namespace) -> int:
    import uvicorn

    from punica.engine.async_engine import AsyncEngine
    from punica.server.app import create_app
    from punica.server.engine_spec import build_engine, spec_from_args
    from punica.server.metrics import Metrics
    from punica.server.state import ServerSettings

    setup_logging(ns.log_level)
    apply_demo_defaults(ns)
    check_names(ns)
    for flag in ("tenant_max_in_flight", "tenant_tokens_per_minute"):
        if getattr(ns, flag) is not None and getattr(ns, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')}: expected >= 1, got "
                              f"{getattr(ns, flag)}")
    key = api_key(ns)
    sock = bind(ns.host, ns.port)
    engine = build_engine(spec_from_args(ns))
    settings = ServerSettings(served_name(ns), key, ns.lora_root, ns.max_n, ns.max_prompts,
                              ns.max_request_bytes, scheduling_policy=ns.scheduling_policy,
                              tenant_from=ns.tenant_from,
                              tenant_max_in_flight=ns.tenant_max_in_flight,
                              tenant_tokens_per_minute=ns.tenant_tokens_per_minute)
    log.info("serving %s with adapters %s on http://%s:%d (API key %s)",
             settings.served_model_name, engine.list_loras(), ns.host, ns.port,
             "required" if key else "off")
    print(f"punica: serving {settings.served_model_name} with adapters "
          f"{engine.list_loras()} on http://{ns.host}:{ns.port}", flush=True)
    metrics = Metrics(engine)
    async_engine = AsyncEngine(engine, ns.max_in_flight, observer=metrics.observe)
    config = uvicorn.Config(create_app(async_engine, settings, metrics), log_level="warning",
                            log_config=None, limit_concurrency=ns.max_connections)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        async_engine.shutdown()
        sock.close()
    return 0
