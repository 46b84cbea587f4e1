"""save_peft writes folders that PEFT itself loads with the same weights, and that Punica's
loader reads back exactly."""

from __future__ import annotations

from pathlib import Path

import torch

from punica.lora.peft import load_adapter
from punica.lora.peft_writer import save_peft
from punica.models.arch import load_arch
from punica.models.random import random_adapter
from tests.checkpoints import save_model


def test_round_trip_through_peft_and_punica(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = save_model(tmp_path / "m", "llama")
    arch = load_arch(base)
    weights = random_adapter("w", arch, 4, torch.float32, seed=5, projections=("q", "v", "down"))
    folder = save_peft(weights, arch, tmp_path / "org" / "w")
    back = load_adapter("w", folder, arch, max_rank=8)
    assert set(back.modules) == set(weights.modules)
    for key, m in weights.modules.items():
        assert torch.equal(back.modules[key].A, m.A) and torch.equal(back.modules[key].B, m.B)
        assert back.modules[key].scale == m.scale
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)),
                                      str(folder))
    state = model.state_dict()
    a = state["base_model.model.model.layers.1.mlp.down_proj.lora_A.default.weight"]
    assert torch.equal(a, weights.modules[(1, "down")].A)
    assert model.peft_config["default"].r == 4
