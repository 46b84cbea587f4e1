"""The offline API: `LLM(model=...).generate(prompts, SamplingParams(...), lora=...)`."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence as Seq

from tqdm import tqdm

from punica.config import CacheConfig, EngineConfig, LoraConfig, ModelConfig
from punica.engine.llm_engine import LLMEngine
from punica.engine.outputs import RequestOutput
from punica.engine.sampling_params import SamplingParams
from punica.engine.scheduler import SchedulerConfig
from punica.errors import InvalidRequestError

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str, dtype: str = ModelConfig.dtype,
                 device: str = ModelConfig.device, max_loras: int = LoraConfig.max_loras,
                 max_lora_rank: int = LoraConfig.max_lora_rank,
                 max_cpu_loras: int | None = LoraConfig.max_cpu_loras,
                 max_num_seqs: int = SchedulerConfig.max_num_seqs,
                 max_num_batched_tokens: int = SchedulerConfig.max_num_batched_tokens,
                 block_size: int = CacheConfig.block_size,
                 kv_cache_bytes: int = CacheConfig.kv_cache_bytes,
                 num_kv_blocks: int | None = CacheConfig.num_blocks,
                 gpu_memory_utilization: float = CacheConfig.gpu_memory_utilization,
                 max_model_len: int | None = ModelConfig.max_model_len,
                 seed: int = ModelConfig.seed, allow_pickle: bool = LoraConfig.allow_pickle,
                 attention_backend: str = ModelConfig.attention_backend,
                 enforce_eager: bool = ModelConfig.enforce_eager,
                 shrink_beside_gemm: bool = LoraConfig.shrink_beside_gemm,
                 decode_split_tokens: int = ModelConfig.decode_split_tokens,
                 lora_root: str | None = LoraConfig.lora_root,
                 max_cpu_lora_bytes: int | None = LoraConfig.max_cpu_lora_bytes,
                 lora_loader_threads: int = LoraConfig.loader_threads,
                 pinned_lora_bytes: int | None = LoraConfig.pinned_lora_bytes,
                 lora_loader_processes: int = LoraConfig.loader_processes) -> None:
        """Every default is its config field's (punica.config): one place sets each."""
        self.engine = LLMEngine(EngineConfig(
            model=ModelConfig(model, dtype, device, max_model_len, seed, attention_backend,
                              enforce_eager, decode_split_tokens),
            cache=CacheConfig(block_size, gpu_memory_utilization, kv_cache_bytes, num_kv_blocks),
            lora=LoraConfig(max_loras, max_lora_rank, max_cpu_loras, allow_pickle,
                            shrink_beside_gemm, max_cpu_lora_bytes, lora_loader_threads,
                            lora_root, pinned_lora_bytes, lora_loader_processes),
            scheduler=SchedulerConfig(max_num_seqs, max_num_batched_tokens)))
        self._ids = itertools.count()

    def load_lora(self, name: str, path: str) -> None:
        self.engine.load_lora(name, path)

    def remove_lora(self, name: str) -> None:
        self.engine.remove_lora(name)

    def generate(self, prompts: Prompt | Seq[Prompt],
                 params: SamplingParams | Seq[SamplingParams] | None = None,
                 lora: str | None | Seq[str | None] = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete every prompt (text or token ids); outputs in the order of `prompts`."""
        batch = _as_prompt_list(prompts)
        params_list = _per_prompt(params or SamplingParams(), len(batch), "params")
        lora_list = _per_prompt(lora, len(batch), "lora")
        ids = []
        try:
            for prompt, p, name in zip(batch, params_list, lora_list, strict=True):
                rid = f"gen-{next(self._ids)}"
                self.engine.add_request(rid, self._encode(prompt), p, name)
                ids.append(rid)
        except Exception:
            for rid in ids:
                self.engine.abort(rid)
            raise
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm) as bar:
            while len(done) < len(ids):
                if self.engine.waiting_on_reads():
                    time.sleep(0.001)  # adapters' files are being read on loader threads
                for out in self.engine.step(updates=False):
                    if out.finished:
                        done[out.request_id] = out
                        bar.update()
        return [done[rid] for rid in ids]

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            tok = self.engine.tokenizer
            if tok is None:
                raise InvalidRequestError("prompt: text needs a tokenizer, and the model "
                                          "directory has none (pass token ids)")
            return list(tok.encode(prompt))
        return list(prompt)


def _as_prompt_list(prompts: Prompt | Seq[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    items = list(prompts)
    if items and all(isinstance(t, int) for t in items):
        return [items]
    return items


def _per_prompt(value: object, n: int, name: str) -> list:
    if isinstance(value, list | tuple):
        if len(value) != n:
            raise InvalidRequestError(f"{name}: expected one per prompt ({n}), got {len(value)}")
        return list(value)
    return [value] * n
