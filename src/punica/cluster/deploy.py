"""Punica on Ray: start the engine actors and the frontend, and `punica cluster` (the OpenAI
server over a cluster: a local Ray cluster it starts, or one it joins with --address)."""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from punica.errors import ClusterStartError, ConfigError
from punica.server.engine_spec import EngineSpec

log = logging.getLogger(__name__)
ENGINE_THREADS = 4
"""Concurrent calls an engine actor serves (a poll, adds and aborts, adapter calls)."""


@dataclass(frozen=True)
class ClusterConfig:
    num_engines: int = 2
    """Engine actors, one LLMEngine each."""
    gpus_per_engine: float = 0.0
    """GPUs per engine actor; below 1 several engines share a GPU; 0 runs on the CPU."""
    cpus_per_engine: float = 1.0
    """Ray CPUs reserved per engine actor."""
    max_in_flight: int = 1024
    """Requests in flight (queued or placed) before new ones get 503."""
    start_timeout_s: float = 600.0
    """How long the engines may take to start (and to be scheduled by Ray)."""
    restart_engines: bool = True
    """Start a dead engine again (with backoff); False: it stays dead."""

    def __post_init__(self) -> None:
        if self.num_engines < 1:
            raise ValueError(f"num_engines: expected >= 1, got {self.num_engines}")
        if self.gpus_per_engine < 0 or self.cpus_per_engine < 0:
            raise ValueError("gpus_per_engine and cpus_per_engine: expected >= 0, got "
                             f"{self.gpus_per_engine}, {self.cpus_per_engine}")
        if self.gpus_per_engine > 1 and self.gpus_per_engine != int(self.gpus_per_engine):
            raise ValueError("gpus_per_engine: above 1 it must be whole, got "
                             f"{self.gpus_per_engine}")


def start_cluster(spec: EngineSpec, config: ClusterConfig) -> object:
    """Start the engines in the Ray cluster this process is connected to (ray.init first) and
    return their frontend, a ClusterEngine. Engines sharing a GPU start one after the other
    (each sizes its memory from what the previous ones left)."""
    import ray

    from punica.cluster.engine_worker import EngineWorker
    from punica.cluster.frontend import ClusterEngine

    worker = ray.remote(EngineWorker).options(
        num_cpus=config.cpus_per_engine, num_gpus=config.gpus_per_engine,
        max_concurrency=ENGINE_THREADS)
    share = config.gpus_per_engine if 0 < config.gpus_per_engine < 1 else 1.0
    actors, infos = [], []
    try:
        for i in range(config.num_engines):
            actors.append(worker.remote(i, spec, share))
            if share < 1:
                infos.append(ray.get(actors[-1].info.remote(), timeout=config.start_timeout_s))
        if share == 1:
            infos = ray.get([a.info.remote() for a in actors], timeout=config.start_timeout_s)
    except ray.exceptions.GetTimeoutError as err:
        _kill(actors)
        raise ClusterStartError(
            f"{config.num_engines} engines did not start in {config.start_timeout_s:.0f} s: "
            f"does the Ray cluster have {config.gpus_per_engine} GPU(s) and "
            f"{config.cpus_per_engine} CPU(s) free per engine?") from err
    except ray.exceptions.RayError as err:
        _kill(actors)
        raise ClusterStartError(f"an engine failed to start: {err}") from err
    shapes = {(i.vocab_size, i.max_model_len, i.adapters) for i in infos}
    if len(shapes) != 1:
        _kill(actors)
        raise ClusterStartError(f"the engines differ (vocab, max_model_len, adapters): {shapes}")
    tokenizer = None
    if not spec.is_random:
        from punica.tokens import load_tokenizer

        tokenizer = load_tokenizer(spec.config.model.model)
    start = (lambda eid: worker.remote(eid, spec, share)) if config.restart_engines else None
    return ClusterEngine(actors, infos, tokenizer, config.max_in_flight, start)


def _kill(actors: list) -> None:
    import ray

    for actor in actors:
        ray.kill(actor)


def add_cluster_routes(app: object, cluster: object, base_name: str) -> None:
    @app.get("/cluster/status")
    async def cluster_status() -> dict:
        return await cluster.status(base_name)


def _refuse_tenant_flags(ns: argparse.Namespace) -> None:
    """The cluster's frontend queue is FCFS and it keeps no per-tenant limits yet: say so
    rather than start with flags that would do nothing."""
    given = [f"--{flag.replace('_', '-')}" for flag, default in (
        ("scheduling_policy", "fcfs"), ("tenant_from", "adapter"), ("tenant_weights", None),
        ("tenant_max_in_flight", None), ("tenant_tokens_per_minute", None))
        if getattr(ns, flag, default) != default]
    if given:
        raise ConfigError(f"{', '.join(given)}: not supported by punica cluster yet (its "
                          "queue is first come, first served); use punica serve")


def add_cluster_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--num-engines", type=int, default=2, help="engine actors (one LLMEngine "
                    "each)")
    ap.add_argument("--gpus-per-engine", type=float, help="GPUs per engine: below 1 engines "
                    "share a GPU; 0 runs on the CPU (default: 1 when the cluster has GPUs "
                    "and --device is not cpu, else 0)")
    ap.add_argument("--cpus-per-engine", type=float, default=1.0)
    ap.add_argument("--address", help="join this Ray cluster (default: start a local one)")


def run_cluster(ns: argparse.Namespace) -> int:
    import ray
    import uvicorn

    from punica.server.app import create_app
    from punica.server.engine_spec import spec_from_args
    from punica.server.serve import (
        api_key,
        apply_demo_defaults,
        bind,
        check_names,
        served_name,
        setup_logging,
    )
    from punica.server.state import ServerSettings

    setup_logging(ns.log_level)
    apply_demo_defaults(ns)
    check_names(ns)
    _refuse_tenant_flags(ns)
    key = api_key(ns)
    sock = bind(ns.host, ns.port)
    _absolute_paths(ns)
    spec = spec_from_args(ns)
    # SIGTERM while the engines start (before uvicorn handles it) must still stop Ray.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    cluster = None
    try:
        if ns.address is None:
            cpus = max(os.cpu_count() or 1, math.ceil(ns.num_engines * ns.cpus_per_engine) + 1)
            ray.init(address="local", num_cpus=cpus, include_dashboard=False)
        else:
            ray.init(address=ns.address)
        gpus = ns.gpus_per_engine
        if gpus is None:
            gpus = 1.0 if ns.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0 \
                else 0.0
        try:
            config = ClusterConfig(ns.num_engines, gpus, ns.cpus_per_engine, ns.max_in_flight)
            cluster = start_cluster(spec, config)
        except ValueError as err:
            raise ClusterStartError(str(err)) from err
        settings = ServerSettings(served_name(ns), key, ns.lora_root, ns.max_n,
                                  ns.max_prompts, ns.max_request_bytes)
        app = create_app(cluster, settings)
        add_cluster_routes(app, cluster, settings.served_model_name)
        log.info("serving %s from %d engines (%s GPU each) with adapters %s on http://%s:%d",
                 settings.served_model_name, ns.num_engines, gpus,
                 cluster.engine.list_loras(), ns.host, ns.port)
        print(f"punica: serving {settings.served_model_name} from {ns.num_engines} engines "
              f"({gpus} GPU each) with adapters {cluster.engine.list_loras()} on "
              f"http://{ns.host}:{ns.port}", flush=True)
        uvicorn.Server(uvicorn.Config(app, log_level="warning", log_config=None,
                                      limit_concurrency=ns.max_connections)).run(
            sockets=[sock])
    finally:
        if cluster is not None:
            cluster.shutdown()
        ray.shutdown()
        sock.close()
    return 0


def _absolute_paths(ns: argparse.Namespace) -> None:
    """Engine actors may run in another directory: hand them absolute paths."""
    if Path(ns.model).exists():
        ns.model = str(Path(ns.model).resolve())
    modules = []
    for entry in ns.lora_modules:
        name, sep, path = entry.partition("=")
        if sep and Path(path).exists():
            entry = f"{name}={Path(path).resolve()}"
        modules.append(entry)
    ns.lora_modules = modules
