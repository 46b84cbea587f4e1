"""The model registry: a checkpoint's `architectures` pick its class; unknown ones are refused
with the registered list; a new family is one registered class with its LoRA layout, which the
adapter pool and the PEFT loader follow."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from punica.errors import AdapterLoadError, ModelLoadError
from punica.lora.peft import load_adapter
from punica.lora.pool import LoraPool
from punica.models.arch import ModelArch
from punica.models.layout import LoraLayout
from punica.models.llama import LORA_LAYOUT, CausalLM
from punica.models.loader import load_model
from punica.models.random import random_adapter, tiny
from punica.models.registry import layout_of, model_class, register, registered
from tests.checkpoints import save_model


def test_built_in_families_and_refusal() -> None:
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                 "Qwen3ForCausalLM"):
        assert model_class((name,), "") is CausalLM
        arch = dataclasses.replace(tiny(), architectures=(name,))
        assert layout_of(arch) is LORA_LAYOUT
    assert model_class((), "qwen2") is CausalLM  # no architectures: by model_type
    assert LORA_LAYOUT.projections == ("q", "k", "v", "o", "gate", "up", "down")
    assert LORA_LAYOUT.module_name(3, "gate") == "model.layers.3.mlp.gate_proj"
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel.*not supported.*Llama"):
        model_class(("GPT2LMHeadModel",), "llama")


def test_a_registered_family_builds_its_checkpoints(tmp_path: Path) -> None:
    @register(("TinyTestForCausalLM",), ())
    class TinyTest(CausalLM):
        """A family of one file: here, the Llama layers under another architecture name."""

    assert "TinyTestForCausalLM" in registered()
    base = save_model(tmp_path / "m", "llama")
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(cfg | {"architectures":
                                                        ["TinyTestForCausalLM"]}))
    model, arch, _ = load_model(base, "float32", "cpu")
    assert type(model) is TinyTest and arch.architectures == ("TinyTestForCausalLM",)
    assert layout_of(arch) is LORA_LAYOUT  # a subclass keeps its family's layout


def _mixer_shape(arch: ModelArch, proj: str) -> tuple[int, int]:
    h = arch.hidden_size
    return {"x": (h, h), "z": (h, 2 * h), "out": (h, h)}[proj]


# Another family's projections: two beside each other in one GEMM, one after it, under other
# module names (no MLP projections at all).
MIXER = LoraLayout(groups=(("in", ("x", "z")), ("out", ("out",))),
                   modules=(("x", "mixer.in_x"), ("z", "mixer.in_z"), ("out", "mixer.out_proj")),
                   shape=_mixer_shape, layers="backbone.layers")


@register(("TinyMixerForCausalLM",), (), layout=MIXER)
class TinyMixer:
    """The model class itself is not built here: the pool and the adapter loader only read the
    family's layout."""


def _save(path: Path, tensors: dict[str, torch.Tensor], **cfg: object) -> Path:
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **cfg}))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def test_a_family_with_another_lora_layout(tmp_path: Path) -> None:
    arch = dataclasses.replace(tiny(), architectures=("TinyMixerForCausalLM",))
    h, r = arch.hidden_size, 4
    assert layout_of(arch) is MIXER and arch.proj_shape("z") == (h, 2 * h)
    gen = torch.Generator().manual_seed(0)
    z = "base_model.model.backbone.layers.1.mixer.in_z.lora_{}.weight"
    A, B = torch.randn(r, h, generator=gen), torch.randn(2 * h, r, generator=gen)
    adapter = load_adapter("z", _save(tmp_path / "z", {z.format("A"): A, z.format("B"): B},
                                      r=r, lora_alpha=8, target_modules=["in_z"]), arch, 8)
    assert list(adapter.modules) == [(1, "z")] and adapter.modules[(1, "z")].scale == 2.0

    pool = LoraPool(arch, num_slots=2, max_rank=8, max_tokens=4, dtype=torch.float32,
                    device=torch.device("cpu"))
    assert pool.ranks.shape == (arch.num_layers, 3, 2)
    pool.load(1, adapter)
    A_pool, B_pool, ranks, scales, slices = pool.args(1, "in")
    assert slices == (h, 2 * h) and A_pool.shape == (2, 2 * 8, h)
    assert ranks[:, 1].tolist() == [0, r] and scales[:, 1].tolist() == [0.0, 2.0]
    assert torch.equal(A_pool[1, 8:8 + r], A) and torch.equal(B_pool[1, :r, h:], B.T)
    assert pool.args(0, "out")[4] == () and pool.ranks[0, :, 1].eq(0).all()
    pool.load(0, random_adapter("all", arch, 2, torch.float32))  # all three, every layer
    assert pool.ranks[:, :, 0].eq(2).all()

    At = A.T.contiguous()
    q = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"  # a Llama module
    llama = _save(tmp_path / "q", {q.format("A"): A, q.format("B"): At}, r=r)
    with pytest.raises(AdapterLoadError, match="not a LoRA A/B of x, z or out projections"):
        load_adapter("q", llama, arch, 8)
    with pytest.raises(AdapterLoadError, match=r"layer 1 in_z: expected lora_A \[r, 64\]"):
        load_adapter("z", _save(tmp_path / "bad", {z.format("A"): A, z.format("B"): At}, r=r),
                     arch, 8)
