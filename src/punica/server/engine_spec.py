"""What an engine is built from (its config, the adapters it loads at start) and the building:
one place for `punica serve` and for every engine actor of `punica cluster`."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

from punica.config import CacheConfig, EngineConfig, LoraConfig, ModelConfig
from punica.engine.llm_engine import LLMEngine
from punica.engine.scheduler import SchedulerConfig
from punica.errors import ConfigError

RANDOM_PREFIX = "random:"


@dataclass(frozen=True)
class EngineSpec:
    config: EngineConfig
    lora_modules: tuple[tuple[str, str], ...] = ()
    """(name, directory) of the PEFT adapters loaded at start."""
    random_adapters: int = 0
    """With a `random:<shape>` model: this many random rank-16 adapters lora0, lora1, ..."""

    @property
    def is_random(self) -> bool:
        return self.config.model.model.startswith(RANDOM_PREFIX)


def engine_config(ns: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(ns.model, ns.dtype, ns.device, ns.max_model_len, ns.seed,
                          enforce_eager=ns.enforce_eager,
                          decode_split_tokens=ns.decode_split_tokens),
        cache=CacheConfig(ns.block_size, ns.gpu_memory_utilization, ns.kv_cache_bytes,
                          ns.num_kv_blocks),
        lora=LoraConfig(ns.max_loras, ns.max_lora_rank, ns.max_cpu_loras,
                        shrink_beside_gemm=ns.shrink_beside_gemm,
                        max_cpu_lora_bytes=getattr(ns, "max_cpu_lora_bytes", None),
                        loader_threads=getattr(ns, "lora_loader_threads",
                                               LoraConfig.loader_threads),
                        lora_root=getattr(ns, "lora_root", None),
                        pinned_lora_bytes=getattr(ns, "pinned_lora_bytes", None),
                        loader_processes=getattr(ns, "lora_loader_processes", 0)),
        scheduler=SchedulerConfig(ns.max_num_seqs, ns.max_num_batched_tokens,
                                  ns.async_scheduling,
                                  policy=getattr(ns, "scheduling_policy", "fcfs"),
                                  tenant_weights=tenant_weights(
                                      getattr(ns, "tenant_weights", None))))


def tenant_weights(path: str | None) -> tuple[tuple[str, float], ...]:
    """--tenant-weights FILE: a JSON object of tenant -> weight (a number > 0)."""
    if path is None:
        return ()
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"--tenant-weights {path}: cannot be read as JSON ({err})") from None
    if not isinstance(data, dict) or not all(
            isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w) and w > 0
            for w in data.values()):
        raise ConfigError(f"--tenant-weights {path}: expected a JSON object of tenant -> "
                          "weight > 0")
    return tuple((str(t), float(w)) for t, w in sorted(data.items()))


def spec_from_args(ns: argparse.Namespace) -> EngineSpec:
    """The serve flags as a spec; --lora-modules entries must read NAME=DIR (ConfigError)."""
    modules = []
    for entry in ns.lora_modules:
        name, sep, path = entry.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--lora-modules: expected NAME=DIR, got {entry!r}")
        modules.append((name, path))
    return EngineSpec(engine_config(ns), tuple(modules), ns.random_adapters)


def build_engine(spec: EngineSpec) -> LLMEngine:
    engine = _random_engine(spec) if spec.is_random else LLMEngine(spec.config)
    for name, path in spec.lora_modules:
        engine.load_lora(name, path)
    engine.warmup()  # every step graph now, not in the first requests' latency
    return engine


def _random_engine(spec: EngineSpec) -> LLMEngine:
    """An engine over random weights at a named shape, with random adapters (for benchmarks)."""
    import torch

    from punica.models.random import llama2_7b, random_adapter, random_model, tiny

    shapes = {"random:llama2-7b": llama2_7b, "random:tiny": tiny}
    mc = spec.config.model
    if mc.model not in shapes:
        raise ConfigError(f"--model: expected a directory or one of {sorted(shapes)}")
    arch = shapes[mc.model]()
    device = torch.device(mc.device if mc.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    engine = LLMEngine(spec.config, model=random_model(arch, torch.float16, device))
    first = random_adapter("lora0", arch, min(16, spec.config.lora.max_lora_rank))
    for i in range(spec.random_adapters):
        engine.add_lora_weights(random_adapter(f"lora{i}", arch, 16, shared=first))
    return engine
