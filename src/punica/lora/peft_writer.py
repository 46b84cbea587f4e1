"""Write adapter weights as a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors),
the format `lora/peft.py` reads: benchmarks put thousands of adapters on disk with it.

    save_peft(weights, arch, folder):
        adapter_config.json: r = max rank, lora_alpha = scale * r, target_modules = the leaves
        adapter_model.safetensors: base_model.model.<module>.lora_A.weight [r, in] and
                                   base_model.model.<module>.lora_B.weight [out, r] per module

Every module must have the same rank and scale (a single r / lora_alpha describes them).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from punica.lora.peft import AdapterWeights
from punica.models.arch import ModelArch
from punica.models.registry import layout_of


def save_peft(weights: AdapterWeights, arch: ModelArch, folder: Path) -> Path:
    ranks = {m.rank for m in weights.modules.values()}
    scales = {m.scale for m in weights.modules.values()}
    if len(ranks) != 1 or len(scales) != 1:
        raise ValueError(f"adapter {weights.name!r}: expected one rank and one scale, got "
                         f"ranks {sorted(ranks)} and scales {sorted(scales)}")
    (rank,), (scale,) = ranks, scales
    layout = layout_of(arch)
    projs = sorted({p for _, p in weights.modules}, key=layout.index.__getitem__)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": scale * rank,
              "target_modules": [layout.leaf(p) for p in projs], "bias": "none",
              "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = {}
    for (layer, proj), m in weights.modules.items():
        key = f"base_model.model.{layout.module_name(layer, proj)}"
        tensors[f"{key}.lora_A.weight"] = m.A.contiguous()
        tensors[f"{key}.lora_B.weight"] = m.B.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder
