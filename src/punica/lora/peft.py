"""PEFT LoRA adapters: read `adapter_config.json` + `adapter_model.safetensors`, validate them
against the base model, and return per-module A/B weights with their scales.

Refused with AdapterLoadError and a reason: missing or unreadable files, pickle-only weights
(unless allowed), a non-LoRA peft_type, DoRA, modules_to_save, fan_in_fan_out, trained biases,
target modules outside the seven projections, shapes that do not match the base (k/v sized for
grouped-query attention), ranks above max_lora_rank.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from punica.errors import AdapterLoadError
from punica.models.arch import PROJECTIONS, ModelArch

_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj"
                  r"\.lora_([AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class ModuleLora:
    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@dataclass(frozen=True)
class AdapterWeights:
    name: str
    path: str
    modules: dict[tuple[int, str], ModuleLora]  # (layer, projection) -> weights, on the CPU

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)


def _fail(path: Path, why: str) -> AdapterLoadError:
    return AdapterLoadError(f"adapter at {path}: {why}")


def read_config(path: Path) -> dict:
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        raise _fail(path, "no adapter_config.json (expected a PEFT adapter directory)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise _fail(path, f"adapter_config.json is not valid JSON ({err})") from err
    if cfg.get("peft_type", "LORA") != "LORA":
        raise _fail(path, f"peft_type {cfg.get('peft_type')!r} is not LoRA")
    for key, why in (("use_dora", "DoRA adapters are not supported"),
                     ("fan_in_fan_out", "fan_in_fan_out=True is not supported")):
        if cfg.get(key):
            raise _fail(path, why)
    if cfg.get("modules_to_save"):
        raise _fail(path, f"modules_to_save {cfg['modules_to_save']} is not supported (only "
                          "LoRA deltas on the attention and MLP projections are)")
    if cfg.get("bias", "none") != "none":
        raise _fail(path, f"bias={cfg['bias']!r} is not supported (expected 'none')")
    if not isinstance(cfg.get("r"), int) or cfg["r"] < 1:
        raise _fail(path, f"r: expected a positive integer, got {cfg.get('r')!r}")
    return cfg


def read_tensors(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    st, binary = path / "adapter_model.safetensors", path / "adapter_model.bin"
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(st))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise _fail(path, f"adapter_model.safetensors is corrupt or truncated ({err})") from err
    if binary.is_file():
        if not allow_pickle:
            raise _fail(path, "only adapter_model.bin (pickle) found; pickle files are refused "
                              "unless explicitly allowed (allow_pickle=True)")
        return torch.load(str(binary), map_location="cpu", weights_only=True)
    raise _fail(path, "no adapter_model.safetensors")


def _pattern_value(patterns: dict, module: str, default: float) -> float:
    for key, value in (patterns or {}).items():
        if re.search(rf"(^|\.){key}$", module) or re.fullmatch(key, module):
            return value
    return default


def load_adapter(name: str, path: str | Path, arch: ModelArch, max_rank: int,
                 allow_pickle: bool = False) -> AdapterWeights:
    """Parse and validate a PEFT LoRA adapter for `arch`; weights stay on the CPU."""
    path = Path(path)
    cfg = read_config(path)
    tensors = read_tensors(path, allow_pickle)
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = _KEY.search(key)
        if match is None:
            raise _fail(path, f"weight {key!r} is not a LoRA A/B of q, k, v, o, gate, up or "
                              "down projections (embeddings, lm_head and others are refused)")
        layer, proj, half = int(match[1]), match[2], match[3]
        halves.setdefault((layer, proj), {})[half] = value
    modules = {}
    for (layer, proj), pair in sorted(halves.items()):
        modules[(layer, proj)] = _module(path, cfg, arch, max_rank, layer, proj, pair)
    if not modules:
        raise _fail(path, "no LoRA weights found")
    return AdapterWeights(name=name, path=str(path), modules=modules)


def _module(path: Path, cfg: dict, arch: ModelArch, max_rank: int, layer: int, proj: str,
            pair: dict[str, torch.Tensor]) -> ModuleLora:
    where = f"layer {layer} {proj}_proj"
    if layer >= arch.num_layers:
        raise _fail(path, f"{where}: the base model has {arch.num_layers} layers")
    if set(pair) != {"A", "B"}:
        raise _fail(path, f"{where}: lora_A and lora_B must both be present")
    A, B = pair["A"], pair["B"]
    in_f, out_f = arch.proj_shape(proj)
    rank = A.shape[0]
    if A.dim() != 2 or B.dim() != 2 or tuple(A.shape) != (rank, in_f) or \
            tuple(B.shape) != (out_f, rank):
        raise _fail(path, f"{where}: expected lora_A [r, {in_f}] and lora_B [{out_f}, r], got "
                          f"{tuple(A.shape)} and {tuple(B.shape)} (an adapter for another base?)")
    if rank > max_rank:
        raise _fail(path, f"{where}: rank {rank} exceeds max_lora_rank {max_rank}")
    module = f"model.layers.{layer}.{'mlp' if proj in ('gate', 'up', 'down') else 'self_attn'}" \
             f".{proj}_proj"
    alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", cfg["r"]))
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    if not torch.isfinite(A).all() or not torch.isfinite(B).all():
        raise _fail(path, f"{where}: non-finite weights")
    # Kept in the file's dtype (the pool casts on its one copy): host memory stays small.
    return ModuleLora(A=A.contiguous(), B=B.contiguous(), scale=float(scale))


__all__ = ["AdapterWeights", "ModuleLora", "PROJECTIONS", "load_adapter"]
