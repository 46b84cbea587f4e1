"""The LLaMA-architecture family (Llama 2/3, Mistral, Qwen2, Qwen3) over a paged KV cache, with
every request's LoRA delta added after each of the seven projections by SGMV.

Parameter names mirror the Hugging Face checkpoints, so weights load by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from punica.engine.batch import Batch
from punica.lora.pool import LoraPool
from punica.models.arch import ModelArch
from punica.models.attention_backends import AttentionBackend
from punica.models.layout import LoraLayout
from punica.models.registry import register
from punica.models.rope import Rotary
from punica.ops import fused
from punica.ops.attention import DecodeSplit
from punica.ops.lora import add_lora, add_lora_beside
from punica.ops.lora_ref import add_lora_ref


@dataclass
class StepContext:
    """What one forward pass needs beside the weights (passed explicitly, never global)."""

    batch: Batch
    kv_cache: torch.Tensor  # [layers, 2, num_blocks, block_size, kv_heads, head_dim]
    rotary: Rotary
    lora: LoraPool | None
    attention: AttentionBackend
    """The step's attention (models/attention_backends.py); its `fused_kernels` says whether
    the other fused ops run as Triton kernels or as their torch references."""
    lora_stream: torch.cuda.Stream | None = None
    """The side stream each LoRA shrink runs on beside its projection's GEMM (add_lora_beside);
    None: the shrink follows the GEMM on the current stream."""
    decode_split: DecodeSplit | None = None
    """Decode attention splits each context over several programs (DecodeSplit); None: one
    program per sequence and KV head. The caller decides per step (DecodeSplit.wanted)."""
    attention_meta: object = field(init=False)
    """The attention backend's metadata of this batch, built once for every layer."""

    def __post_init__(self) -> None:
        self.attention_meta = self.attention.metadata(self.batch, self.decode_split)

    @property
    def triton(self) -> bool:
        """Whether the fused ops run as Triton kernels (else their torch references)."""
        return self.attention.fused_kernels


def decode_split_of(split: DecodeSplit | None, batch: Batch) -> DecodeSplit | None:
    """The DecodeSplit a step takes: `split` for a decode-only batch it wants, else None."""
    if split is not None and batch.decode_only and split.wanted(batch.seq_lens):
        return split
    return None


class RMSNorm(nn.Module):
    """HF's RMSNorm through the fused op (one kernel on CUDA; the torch reference on CPU)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, triton: bool = True) -> torch.Tensor:
        """Normalise over the last dimension of x [..., dim] (contiguous)."""
        return fused.rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps,
                              triton).view(x.shape)

    def add(self, x: torch.Tensor, residual: torch.Tensor,
            triton: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """residual += x (in place), then (normalised residual, residual)."""
        return fused.add_rms_norm(x, residual, self.weight, self.eps, triton)


def lora_shape(arch: ModelArch, proj: str) -> tuple[int, int]:
    """(in_features, out_features) of a projection; k/v sized for grouped-query attention."""
    h, i = arch.hidden_size, arch.intermediate_size
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    return {"q": (h, q), "k": (h, kv), "v": (h, kv), "o": (q, h), "gate": (h, i), "up": (h, i),
            "down": (i, h)}[proj]


# The seven LoRA projections of the family, grouped as the fused GEMMs below compute them.
LORA_LAYOUT = LoraLayout(
    groups=(("qkv", ("q", "k", "v")), ("o", ("o",)), ("gate_up", ("gate", "up")),
            ("down", ("down",))),
    modules=tuple((p, f"self_attn.{p}_proj") for p in ("q", "k", "v", "o"))
    + tuple((p, f"mlp.{p}_proj") for p in ("gate", "up", "down")),
    shape=lora_shape)

# Checkpoint projections stored as one fused weight here (rows concatenated in this order): one
# GEMM instead of three (two), each projection's LoRA added into its column slice of the output.
FUSED_PROJECTIONS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def _project(linear: nn.Linear, x: torch.Tensor, ctx: StepContext, layer: int,
             group: str) -> torch.Tensor:
    """x @ W.T (+ bias), plus the batch's LoRA deltas of the projections of `group`
    (LORA_LAYOUT.groups), each into its column slice of the output: one add_lora call (its shrink
    beside the GEMM on ctx.lora_stream when there is one)."""
    if ctx.lora is None:
        return F.linear(x, linear.weight, linear.bias)
    A, B, ranks, scales, slices = ctx.lora.args(layer, group)
    b = ctx.batch
    if ctx.lora.backend == "torch":
        y = F.linear(x, linear.weight, linear.bias)
        return add_lora_ref(y, x, A, B, b.lora_indptr, b.lora_slots, ranks, scales, slices)
    if ctx.lora_stream is not None:
        return add_lora_beside(lambda: F.linear(x, linear.weight, linear.bias), x, A, B,
                               b.lora_indptr, b.lora_slots, ranks, scales, ctx.lora.workspace,
                               ctx.lora_stream, check_values=False, slices=slices)
    y = F.linear(x, linear.weight, linear.bias)
    return add_lora(y, x, A, B, b.lora_indptr, b.lora_slots, ranks, scales, ctx.lora.workspace,
                    check_values=False, slices=slices)


class Attention(nn.Module):
    def __init__(self, arch: ModelArch, layer: int) -> None:
        super().__init__()
        self.layer, self.arch = layer, arch
        h, d = arch.hidden_size, arch.head_dim
        self.q_size, self.kv_size = arch.num_heads * d, arch.num_kv_heads * d
        self.qkv_proj = nn.Linear(h, self.q_size + 2 * self.kv_size, bias=arch.qkv_bias)
        self.o_proj = nn.Linear(arch.num_heads * d, h, bias=False)
        if arch.qk_norm:
            self.q_norm = RMSNorm(d, arch.rms_norm_eps)
            self.k_norm = RMSNorm(d, arch.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        a, n = self.arch, x.shape[0]
        qkv = _project(self.qkv_proj, x, ctx, self.layer, "qkv")
        qs, ks = self.q_size, self.kv_size
        q = qkv[:, :qs].view(n, a.num_heads, a.head_dim)
        k = qkv[:, qs:qs + ks].view(n, a.num_kv_heads, a.head_dim)
        v = qkv[:, qs + ks:].view(n, a.num_kv_heads, a.head_dim)
        if a.qk_norm:
            q, k = self.q_norm(q, ctx.triton), self.k_norm(k, ctx.triton)
        out = ctx.attention.attend(q, k, v, ctx.kv_cache[self.layer, 0],
                                   ctx.kv_cache[self.layer, 1], ctx.rotary, a.head_dim**-0.5,
                                   ctx.attention_meta)
        return _project(self.o_proj, out.view(n, -1), ctx, self.layer, "o")


class MLP(nn.Module):
    def __init__(self, arch: ModelArch, layer: int) -> None:
        super().__init__()
        self.layer, i = layer, arch.intermediate_size
        self.gate_up_proj = nn.Linear(arch.hidden_size, 2 * i, bias=False)
        self.down_proj = nn.Linear(i, arch.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        gate_up = _project(self.gate_up_proj, x, ctx, self.layer, "gate_up")
        i = gate_up.shape[1] // 2
        act = fused.silu_and_mul(gate_up[:, :i], gate_up[:, i:], ctx.triton)
        return _project(self.down_proj, act, ctx, self.layer, "down")


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(arch, layer)
        self.mlp = MLP(arch, layer)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor,
                ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """h = input_layernorm(residual) on entry; returns (mlp output, residual), the residual
        now holding the attention sum; the caller adds the mlp output (fused with the next norm).
        """
        h, residual = self.post_attention_layernorm.add(self.self_attn(h, ctx), residual,
                                                        ctx.triton)
        return self.mlp(h, ctx), residual


class Backbone(nn.Module):
    def __init__(self, arch: ModelArch) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch, i) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)


@register(("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"),
          ("llama", "mistral", "qwen2", "qwen3"), layout=LORA_LAYOUT)
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
        layers = self.model.layers
        residual = self.model.embed_tokens(ctx.batch.input_ids)
        h = layers[0].input_layernorm(residual, ctx.triton)
        for i, layer in enumerate(layers):
            out, residual = layer(h, residual, ctx)
            if i + 1 < len(layers):  # residual += out, normalised for the next layer
                h, residual = layers[i + 1].input_layernorm.add(out, residual, ctx.triton)
        rows = ctx.batch.logits_rows
        x, _ = self.model.norm.add(out[rows], residual[rows], ctx.triton)
        return F.linear(x, self.logits_weight()).float()
