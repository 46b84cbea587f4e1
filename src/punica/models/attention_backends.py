"""Attention backends: the paged attention of a step (rotary, KV write, attention) behind one small
protocol, so the model, the engine, the graphs and the benchmarks never switch on a name.

Each backend builds its own metadata from the step's Batch once per forward pass (`metadata`),
and every layer's `attend` reads it:

    attend(q [T, H, D], k [T, H_kv, D], v [T, H_kv, D], k_cache, v_cache, rotary, scale, meta)
        q, k = rotary(q, k at meta.positions)
        k_cache/v_cache.view(-1, H_kv, D)[meta.slot_mapping] = k, v   (slot < 0: skipped)
        out [T, H, D] = causal softmax(q K^T * scale) V of each sequence over its paged context

- `TritonAttention`: the fused rotary + KV write kernel and the paged prefill/decode kernels
  (ops/attention.py), device tensors only, no host sync: CUDA graphs can capture it; decode steps
  may split long contexts (DecodeSplit).
- `TorchAttention`: the pure-torch references (ops/attention_ref.py), reading the batch's host
  lists: any device, never captured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from punica.engine.batch import Batch
from punica.models.rope import Rotary
from punica.ops import fused
from punica.ops.attention import DecodeSplit, paged_decode, paged_prefill, rotary_write_kv_cache
from punica.ops.attention_ref import paged_attention_ref, write_kv


class AttentionBackend(Protocol):
    name: str
    fused_kernels: bool
    """Whether the step's other fused ops (norms, rotary, SiLU, the LoRA kernels) run as Triton
    kernels too (else their torch references)."""
    capturable: bool
    """Whether a CUDA graph can capture its steps (no host reads, fixed launch geometry)."""
    splits_decode: bool
    """Whether decode steps can take a DecodeSplit."""

    def metadata(self, batch: Batch, split: DecodeSplit | None) -> object:
        """What every layer's attend reads, built once per forward pass."""
        ...

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, rotary: Rotary, scale: float,
               meta: object) -> torch.Tensor:
        """See the module docstring; q and k are rotated in place."""
        ...


@dataclass(frozen=True)
class TritonMeta:
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32
    decode_only: bool
    split: DecodeSplit | None


class TritonAttention:
    name = "triton"
    fused_kernels = True
    capturable = True
    splits_decode = True

    def metadata(self, batch: Batch, split: DecodeSplit | None) -> TritonMeta:
        return TritonMeta(batch.positions, batch.slot_mapping, batch.cu_seqlens_q_t,
                          batch.seq_lens_t, batch.block_tables_t, batch.decode_only,
                          split if batch.decode_only else None)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, rotary: Rotary, scale: float,
               meta: TritonMeta) -> torch.Tensor:
        rotary_write_kv_cache(q, k, v, meta.positions, rotary.cos, rotary.sin, k_cache,
                              v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        if meta.decode_only:
            split = meta.split
            paged_decode(q, k_cache, v_cache, meta.seq_lens, meta.block_tables, scale, out,
                         max_context=split.max_context if split else None,
                         workspace=split.workspace if split else None)
        else:
            paged_prefill(q, k_cache, v_cache, meta.cu_seqlens_q, meta.seq_lens,
                          meta.block_tables, scale, out)
        return out


@dataclass(frozen=True)
class TorchMeta:
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64
    cu_seqlens_q: list[int]  # [B + 1]
    seq_lens: list[int]  # [B]
    block_tables: list[list[int]]  # [B][blocks]


class TorchAttention:
    name = "torch"
    fused_kernels = False
    capturable = False
    splits_decode = False

    def metadata(self, batch: Batch, split: DecodeSplit | None) -> TorchMeta:
        return TorchMeta(batch.positions, batch.slot_mapping, batch.cu_seqlens_q,
                         batch.seq_lens, batch.block_tables)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, rotary: Rotary, scale: float,
               meta: TorchMeta) -> torch.Tensor:
        fused.rotary_(q, meta.positions, rotary.cos, rotary.sin, triton=False)
        fused.rotary_(k, meta.positions, rotary.cos, rotary.sin, triton=False)
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        return paged_attention_ref(q, k_cache, v_cache, meta.cu_seqlens_q, meta.seq_lens,
                                   meta.block_tables, scale)


BACKENDS: dict[str, AttentionBackend] = {"triton": TritonAttention(), "torch": TorchAttention()}


def attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """The backend `name` (ModelConfig.attention_backend); auto: Triton on CUDA, else torch."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    backend = BACKENDS.get(name)
    if backend is None:
        raise ValueError(f"attention_backend: expected auto or one of {sorted(BACKENDS)}, got "
                         f"{name!r}")
    return backend
