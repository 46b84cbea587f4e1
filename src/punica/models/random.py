"""Random-weight models and adapters at real shapes, built in memory (for benchmarks)."""

from __future__ import annotations

import torch

from punica.lora.peft import AdapterWeights, ModuleLora
from punica.models.arch import ModelArch
from punica.models.llama import CausalLM
from punica.models.registry import layout_of


def llama2_7b() -> ModelArch:
    """The LLaMA-2-7B shape of DESIGN.md: hidden 4096, intermediate 11008, 32 layers, 32 heads."""
    return ModelArch(model_type="llama", hidden_size=4096, intermediate_size=11008,
                     num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                     vocab_size=32000, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=(),
                     max_position_embeddings=4096, tie_word_embeddings=False, qkv_bias=False,
                     qk_norm=False, eos_token_ids=())


def tiny(num_layers: int = 2) -> ModelArch:
    return ModelArch(model_type="llama", hidden_size=64, intermediate_size=96,
                     num_layers=num_layers, num_heads=4, num_kv_heads=2, head_dim=16,
                     vocab_size=256, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=(),
                     max_position_embeddings=512, tie_word_embeddings=False, qkv_bias=False,
                     qk_norm=False, eos_token_ids=())


@torch.no_grad()
def random_model(arch: ModelArch, dtype: torch.dtype, device: torch.device,
                 seed: int = 0) -> CausalLM:
    """Weights ~ N(0, 0.02^2), norms 1: a model with real shapes and no checkpoint."""
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = CausalLM(arch)
    state = {}
    for name, param in model.state_dict().items():
        if "norm" in name:
            state[name] = torch.ones(param.shape, dtype=dtype, device=device)
        else:
            t = torch.empty(param.shape, dtype=dtype, device=device)
            state[name] = t.normal_(0.0, 0.02, generator=gen)
    model.load_state_dict(state, assign=True)
    return model.eval()


def random_adapter(name: str, arch: ModelArch, rank: int, dtype: torch.dtype = torch.float16,
                   seed: int = 0, projections: tuple[str, ...] | None = None,
                   shared: AdapterWeights | None = None,
                   device: torch.device | None = None) -> AdapterWeights:
    """Rank-`rank` LoRA on `projections` (default: all of the family's, `layout_of(arch)`) of
    every layer, kept on the CPU; `shared` reuses another's tensors under a new name (distinct
    slots, same bytes: host memory stays small for many adapters); `device`: where the numbers
    are drawn (a GPU draws thousands of adapters fast; its stream differs from the CPU's)."""
    if shared is not None:
        return AdapterWeights(name=name, path="", modules=shared.modules)
    layout = layout_of(arch)
    device = device or torch.device("cpu")
    gen = torch.Generator(device=device).manual_seed(seed)
    modules = {}
    for layer in range(arch.num_layers):
        for proj in layout.projections if projections is None else projections:
            in_f, out_f = layout.shape(arch, proj)
            A = torch.randn(rank, in_f, generator=gen, device=device) * in_f**-0.5
            B = torch.randn(out_f, rank, generator=gen, device=device) * 0.01
            modules[(layer, proj)] = ModuleLora(A=A.to(dtype).cpu(), B=B.to(dtype).cpu(),
                                                scale=2.0)
    return AdapterWeights(name=name, path="", modules=modules)
