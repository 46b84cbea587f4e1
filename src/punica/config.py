"""Frozen configs of the engine; CLI flags map to these fields one to one (vLLM's names)."""

from __future__ import annotations

from dataclasses import dataclass, field

from punica.engine.scheduler import SchedulerConfig


@dataclass(frozen=True)
class ModelConfig:
    model: str
    """Hugging Face model directory (config.json + *.safetensors [+ tokenizer])."""
    dtype: str = "auto"
    """auto (the checkpoint's), float16, bfloat16 or float32."""
    device: str = "auto"
    """auto (cuda when available), cuda, cuda:N or cpu."""
    max_model_len: int | None = None
    """Longest prompt + completion; default: the model's max_position_embeddings."""
    seed: int = 0
    """Seed of the generator used by requests without a seed of their own."""
    attention_backend: str = "auto"
    """auto (Triton paged kernels on CUDA, torch reference on CPU), triton or torch."""
    enforce_eager: bool = False
    """Never use CUDA graphs (otherwise decode steps are captured per batch-size bucket, and
    mixed steps of up to 512 rows per token and sequence bucket)."""
    decode_split_tokens: int = 512
    """Decode steps where some context is longer than this split every context into runs of
    about this many tokens, one program each, merged in the kernel (Triton attention); 0:
    never split."""


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    """Tokens per KV block."""
    gpu_memory_utilization: float = 0.9
    """On CUDA: fraction of the device memory the engine may use: weights, adapter pool, the
    steps' activations and graphs (measured by a profiled step at start), and the KV pool, which
    takes what is left (engine/sizing.py)."""
    kv_cache_bytes: int = 256 << 20
    """On CPU: bytes of the KV pool."""
    num_blocks: int | None = None
    """Override: exactly this many KV blocks."""


@dataclass(frozen=True)
class LoraConfig:
    max_loras: int = 8
    """Adapter slots on the device (adapters in one batch at most); 0 disables LoRA."""
    max_lora_rank: int = 64
    max_cpu_loras: int | None = None
    """Adapters kept parsed in host memory (LRU); default max(4 * max_loras, 32)."""
    allow_pickle: bool = False
    """Accept adapter_model.bin (pickle) when no safetensors file exists."""
    shrink_beside_gemm: bool = True
    """On CUDA, in step graphs: run each LoRA shrink on a side stream while the base GEMM of
    its projection runs (`ops.lora.add_lora_beside`), rather than after it."""
    max_cpu_lora_bytes: int | None = None
    """Host cache bound in bytes as well (None: by count only)."""
    loader_threads: int = 2
    """Threads that read adapter files off the engine's step thread (a request whose adapter is
    being read waits in the queue, holding no KV); 0: read on the engine thread."""
    lora_root: str | None = None
    """Just-in-time adapters: a request naming a folder below this root (nested names such as
    org/name allowed) loads it on first use, no load call needed."""
    pinned_lora_bytes: int | None = None
    """On CUDA: pinned host memory allocated at start for adapters read from files
    (lora/pinned_arena.py); default max_cpu_lora_bytes, else 4 GiB. Unless max_cpu_lora_bytes
    is set, the host cache is bounded by it too, so evictions recycle the arena."""
    loader_processes: int = 0
    """Read and convert adapters in this many processes (lora/loader_process.py; each
    loader thread waits on one), so that none of that work holds the engine process's GIL;
    the arena is then shared memory (on any device). 0: on the loader threads themselves."""

    def __post_init__(self) -> None:
        if self.max_loras < 0 or self.max_lora_rank < 1 or (
                self.max_cpu_loras is not None and self.max_cpu_loras < 1) or (
                self.pinned_lora_bytes is not None and self.pinned_lora_bytes < 0) or \
                self.loader_processes < 0 or (
                self.loader_processes > 0 and self.loader_threads == 0):
            raise ValueError("max_loras >= 0, max_lora_rank >= 1, max_cpu_loras >= 1, "
                             "pinned_lora_bytes >= 0 and loader_processes >= 0 (and loader "
                             "threads to wait on them) expected, got "
                             f"{self.max_loras}, {self.max_lora_rank}, {self.max_cpu_loras}, "
                             f"{self.pinned_lora_bytes}, {self.loader_processes}")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
