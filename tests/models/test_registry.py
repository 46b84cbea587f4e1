"""The model registry: a checkpoint's `architectures` pick its class; unknown ones are refused
with the registered list; a new family is one registered class."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from punica.errors import ModelLoadError
from punica.models.llama import CausalLM
from punica.models.loader import load_model
from punica.models.registry import model_class, register, registered
from tests.checkpoints import save_model


def test_built_in_families_and_refusal() -> None:
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                 "Qwen3ForCausalLM"):
        assert model_class((name,), "") is CausalLM
    assert model_class((), "qwen2") is CausalLM  # no architectures: by model_type
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
