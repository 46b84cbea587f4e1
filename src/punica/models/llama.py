"""The LLaMA-architecture family (Llama 2/3, Mistral, Qwen2, Qwen3) over a paged KV cache, with
every request's LoRA delta added after each of the seven projections by SGMV.

Parameter names mirror the Hugging Face checkpoints, so weights load by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from punica.engine.batch import Batch
from punica.lora.pool import LoraPool
from punica.models.arch import ModelArch
from punica.models.rope import Rotary
from punica.ops.attention import paged_decode, paged_prefill, write_kv_cache
from punica.ops.attention_ref import paged_attention_ref, write_kv
from punica.ops.lora import add_lora
from punica.ops.lora_ref import add_lora_ref


@dataclass
class StepContext:
    """What one forward pass needs beside the weights (passed explicitly, never global)."""

    batch: Batch
    kv_cache: torch.Tensor  # [layers, 2, num_blocks, block_size, kv_heads, head_dim]
    rotary: Rotary
    lora: LoraPool | None
    attention_backend: str = "torch"
    """torch: the reference (any device); triton: the paged kernels (CUDA, or the interpreter)."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _project(linear: nn.Linear, x: torch.Tensor, ctx: StepContext, layer: int,
             proj: str) -> torch.Tensor:
    y = F.linear(x, linear.weight, linear.bias)
    if ctx.lora is not None:
        A, B, ranks, scales = ctx.lora.args(layer, proj)
        b = ctx.batch
        if ctx.lora.backend == "torch":
            add_lora_ref(y, x, A, B, b.lora_indptr, b.lora_slots, ranks, scales)
        else:
            add_lora(y, x, A, B, b.lora_indptr, b.lora_slots, ranks, scales,
                     ctx.lora.workspace, check_values=False)
    return y


class Attention(nn.Module):
    def __init__(self, arch: ModelArch, layer: int) -> None:
        super().__init__()
        self.layer, self.arch = layer, arch
        h, d = arch.hidden_size, arch.head_dim
        self.q_proj = nn.Linear(h, arch.num_heads * d, bias=arch.qkv_bias)
        self.k_proj = nn.Linear(h, arch.num_kv_heads * d, bias=arch.qkv_bias)
        self.v_proj = nn.Linear(h, arch.num_kv_heads * d, bias=arch.qkv_bias)
        self.o_proj = nn.Linear(arch.num_heads * d, h, bias=False)
        if arch.qk_norm:
            self.q_norm = RMSNorm(d, arch.rms_norm_eps)
            self.k_norm = RMSNorm(d, arch.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx: StepContext,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        a, b, n = self.arch, ctx.batch, x.shape[0]
        q = _project(self.q_proj, x, ctx, self.layer, "q").view(n, a.num_heads, a.head_dim)
        k = _project(self.k_proj, x, ctx, self.layer, "k").view(n, a.num_kv_heads, a.head_dim)
        v = _project(self.v_proj, x, ctx, self.layer, "v").view(n, a.num_kv_heads, a.head_dim)
        if a.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = Rotary.apply(q, *rope), Rotary.apply(k, *rope)
        k_cache, v_cache = ctx.kv_cache[self.layer, 0], ctx.kv_cache[self.layer, 1]
        scale = a.head_dim**-0.5
        if ctx.attention_backend == "triton":
            write_kv_cache(k, v, k_cache, v_cache, b.slot_mapping)
            out = torch.empty_like(q)
            if b.decode_only:
                paged_decode(q, k_cache, v_cache, b.seq_lens_t, b.block_tables_t, scale, out)
            else:
                paged_prefill(q, k_cache, v_cache, b.cu_seqlens_q_t, b.seq_lens_t,
                              b.block_tables_t, scale, out)
        else:
            write_kv(k_cache, v_cache, k, v, b.slot_mapping)
            out = paged_attention_ref(q, k_cache, v_cache, b.cu_seqlens_q, b.seq_lens,
                                      b.block_tables, scale)
        return _project(self.o_proj, out.view(n, -1), ctx, self.layer, "o")


class MLP(nn.Module):
    def __init__(self, arch: ModelArch, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.gate_proj = nn.Linear(arch.hidden_size, arch.intermediate_size, bias=False)
        self.up_proj = nn.Linear(arch.hidden_size, arch.intermediate_size, bias=False)
        self.down_proj = nn.Linear(arch.intermediate_size, arch.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        gate = _project(self.gate_proj, x, ctx, self.layer, "gate")
        up = _project(self.up_proj, x, ctx, self.layer, "up")
        return _project(self.down_proj, F.silu(gate) * up, ctx, self.layer, "down")


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(arch, layer)
        self.mlp = MLP(arch, layer)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx: StepContext,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx, rope)
        return x + self.mlp(self.post_attention_layernorm(x), ctx)


class Backbone(nn.Module):
    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch, i) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.arch = arch
        self.model = Backbone(arch)
        if not arch.tie_word_embeddings:
            self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)

    def logits_weight(self) -> torch.Tensor:
        if self.arch.tie_word_embeddings:
            return self.model.embed_tokens.weight
        return self.lm_head.weight

    @torch.inference_mode()
    def forward(self, ctx: StepContext) -> torch.Tensor:
        """float32 logits [N, vocab] of the batch's sampled rows."""
        x = self.model.embed_tokens(ctx.batch.input_ids)
        rope = ctx.rotary.at(ctx.batch.positions)
        for layer in self.model.layers:
            x = layer(x, ctx, rope)
        x = self.model.norm(x[ctx.batch.logits_rows])
        return F.linear(x, self.logits_weight()).float()
