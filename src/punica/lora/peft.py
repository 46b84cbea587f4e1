"""PEFT LoRA adapters: read `adapter_config.json` + `adapter_model.safetensors`, validate them
against the base model, and return per-module A/B weights with their scales.

Refused with AdapterLoadError and a reason: missing or unreadable files, files that resolve out
of the adapter root or are not regular files, pickle-only weights (unless allowed), configs of
the wrong types (not an object, a non-integer r, an invalid alpha_pattern regex), a non-LoRA
peft_type, DoRA, modules_to_save, fan_in_fan_out, trained biases, target modules outside the
projections of the base's family (`registry.layout_of`: the seven of LLaMA), shapes that do not
match the base (k/v sized for grouped-query attention),
ranks of 0 or above max_lora_rank, 0-d or integer tensors, scales or weights that are not
finite in float32 / the pool's dtype.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from punica.lora.files import FileStamp, fail, patterns, read_file
from punica.lora.pinned_arena import ArenaBlocks, PinnedArena
from punica.lora.read_buffer import assert_not_in_scratch, scratch
from punica.lora.safetensors_buffer import (
    SafetensorsFormatError,
    as_buffer,
    parse_safetensors,
)
from punica.lora.staged import Stacked, to_pool_form
from punica.models.arch import ModelArch
from punica.models.layout import LoraLayout
from punica.models.registry import layout_of


@functools.cache
def _key_pattern(layout: LoraLayout) -> tuple[re.Pattern[str], dict[str, str]]:
    """The PEFT weight names of the layout's projections ((layer, module path, A or B) groups),
    and each module path's projection."""
    paths = {path: proj for proj, path in layout.modules}
    alternatives = "|".join(re.escape(p) for p in sorted(paths, key=len, reverse=True))
    layers = re.escape(layout.layers.rsplit(".", 1)[-1])
    return re.compile(rf"(?:^|\.){layers}\.(\d+)\.({alternatives})"
                      r"\.lora_([AB])(?:\.[^.]+)?\.weight$"), paths


def _names(layout: LoraLayout) -> str:
    *most, last = layout.projections
    return f"{', '.join(most)} or {last}" if most else last


FP32_MAX = float(torch.finfo(torch.float32).max)


@dataclass(frozen=True)
class ModuleLora:
    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]: read from files, a transposed view of the pool form's [r, out]
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


@dataclass(frozen=True)
class AdapterWeights:
    name: str
    path: str
    modules: dict[tuple[int, str], ModuleLora]  # (layer, projection) -> weights, on the CPU
    stamps: tuple[FileStamp, ...] = ()
    """The files these weights were read from, as they were then (empty: built in memory)."""
    stacked: dict[str, Stacked] = field(default_factory=dict)
    """Projections targeted in every layer at one rank, stacked (`staged.to_pool_form`): the
    modules of such a projection are views into its buffers."""
    blocks: ArenaBlocks | None = None
    """The pinned arena blocks the tensors live in (released when the host copy is dropped)."""

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and \
        math.isfinite(value)


def parse_config(path: Path, data: bytes) -> dict:
    """adapter_config.json's checked content (types and values a LoRA adapter may have)."""
    try:
        cfg = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise fail(path, f"adapter_config.json is not valid JSON ({err})") from err
    if not isinstance(cfg, dict):
        raise fail(path, f"adapter_config.json: expected an object, got {type(cfg).__name__}")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise fail(path, f"peft_type {cfg.get('peft_type')!r} is not LoRA")
    for key, why in (("use_dora", "DoRA adapters are not supported"),
                     ("fan_in_fan_out", "fan_in_fan_out=True is not supported")):
        if cfg.get(key):
            raise fail(path, why)
    if cfg.get("modules_to_save"):
        raise fail(path, f"modules_to_save {cfg['modules_to_save']} is not supported (only "
                          "LoRA deltas on the attention and MLP projections are)")
    if cfg.get("bias", "none") != "none":
        raise fail(path, f"bias={cfg['bias']!r} is not supported (expected 'none')")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise fail(path, f"r: expected a positive integer, got {r!r}")
    alpha = cfg.get("lora_alpha", r)
    if not _number(alpha):
        raise fail(path, f"lora_alpha: expected a finite number, got {alpha!r}")
    if not isinstance(cfg.get("use_rslora", False), bool):
        raise fail(path, f"use_rslora: expected true or false, got {cfg['use_rslora']!r}")
    cfg["_alpha_pattern"] = patterns(path, cfg, "alpha_pattern", _number)
    cfg["_rank_pattern"] = patterns(path, cfg, "rank_pattern", lambda v: isinstance(v, int)
                                     and not isinstance(v, bool) and v >= 1)
    targets = cfg.get("target_modules")
    if targets is not None and not isinstance(targets, str) and not (
            isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise fail(path, f"target_modules: expected a string or a list of strings, got "
                          f"{targets!r}"[:300])
    return cfg


def parse_tensors(path: Path, name: str, data: bytes | torch.Tensor,
                  allow_pickle: bool) -> dict[str, torch.Tensor]:
    if name == "adapter_model.safetensors":
        buf = data if isinstance(data, torch.Tensor) else as_buffer(data)
        try:
            return parse_safetensors(buf)
        except SafetensorsFormatError as err:
            raise fail(path, f"adapter_model.safetensors is corrupt or truncated ({err})") from err
    if not allow_pickle:
        raise fail(path, "only adapter_model.bin (pickle) found; pickle files are refused "
                          "unless explicitly allowed (allow_pickle=True)")
    try:
        tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is the file's
        raise fail(path, f"adapter_model.bin cannot be read ({err.__class__.__name__})") from err
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor)
                                                for t in tensors.values()):
        raise fail(path, "adapter_model.bin: expected a dict of tensors")
    return tensors


def _pattern_value(patterns: dict[re.Pattern, object], module: str, default: float) -> float:
    for pattern, value in patterns.items():
        if pattern.search(module):
            return value
    return default


def read_adapter_files(path: Path, root: Path | None, allow_pickle: bool
                       ) -> tuple[dict, dict[str, torch.Tensor], tuple[FileStamp, ...]]:
    """(checked config, tensors, stamps of the files read)."""
    config = read_file(path, "adapter_config.json", root)
    if config is None:
        raise fail(path, "no adapter_config.json (expected a PEFT adapter directory)")
    cfg = parse_config(path, config[0])
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if name == "adapter_model.bin" and not allow_pickle and \
                os.path.lexists(path / name):
            raise fail(path, "only adapter_model.bin (pickle) found; pickle files are refused "
                              "unless explicitly allowed (allow_pickle=True)")
        found = read_file(path, name, root, as_tensor=name.endswith(".safetensors"),
                          into=scratch)
        if found is not None:
            return cfg, parse_tensors(path, name, found[0], allow_pickle), (config[1], found[1])
    raise fail(path, "no adapter_model.safetensors")


def load_adapter(name: str, path: str | Path, arch: ModelArch, max_rank: int,
                 allow_pickle: bool = False, root: str | Path | None = None,
                 dtype: torch.dtype | None = None, pin: bool = False,
                 arena: PinnedArena | None = None) -> AdapterWeights:
    """Parse and validate a PEFT LoRA adapter for `arch`; weights stay on the CPU, in the
    form a pool slot takes (`staged.to_pool_form`).

    `root`: every file read must resolve below it. `dtype`: the pool's dtype, in which the
    weights (and their scale) must stay finite and are kept. `pin`: in pinned memory (a pool
    on CUDA), from `arena` when given."""
    path = Path(path)
    root = Path(root).resolve() if root is not None else None
    cfg, tensors, stamps = read_adapter_files(path, root, allow_pickle)
    layout = layout_of(arch)
    pattern, projection_of = _key_pattern(layout)
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = pattern.search(key)
        if match is None:
            raise fail(path, f"weight {key!r} is not a LoRA A/B of {_names(layout)} "
                              "projections (embeddings, lm_head and others are refused)")
        layer, proj, half = int(match[1]), projection_of[match[2]], match[3]
        pair = halves.setdefault((layer, proj), {})
        if half in pair:
            raise fail(path, f"layer {layer} {layout.leaf(proj)}: two lora_{half} tensors "
                              f"({key!r} and another)")
        pair[half] = value
    modules = {}
    for (layer, proj), pair in sorted(halves.items()):
        modules[(layer, proj)] = _module(path, cfg, arch, layout, max_rank, layer, proj, pair,
                                         dtype)
    if not modules:
        raise fail(path, "no LoRA weights found")
    modules, stacked, blocks = to_pool_form(path, modules, arch, layout, dtype, pin, arena)
    assert_not_in_scratch(t for m in modules.values() for t in (m.A, m.B))
    weights = AdapterWeights(name=name, path=str(path), modules=modules, stamps=stamps,
                             stacked=stacked, blocks=blocks)
    if blocks is not None:  # weights no registry took (a refused or cancelled load) give back
        weakref.finalize(weights, blocks.release)  # their blocks too (a no-op after _drop)
    return weights


def _module(path: Path, cfg: dict, arch: ModelArch, layout: LoraLayout, max_rank: int,
            layer: int, proj: str, pair: dict[str, torch.Tensor],
            dtype: torch.dtype | None) -> ModuleLora:
    where = f"layer {layer} {layout.leaf(proj)}"
    if layer >= arch.num_layers:
        raise fail(path, f"{where}: the base model has {arch.num_layers} layers")
    if set(pair) != {"A", "B"}:
        raise fail(path, f"{where}: lora_A and lora_B must both be present")
    A, B = pair["A"], pair["B"]
    in_f, out_f = layout.shape(arch, proj)
    if A.dim() != 2 or B.dim() != 2:
        raise fail(path, f"{where}: expected 2-d lora_A and lora_B, got {A.dim()}-d and "
                          f"{B.dim()}-d tensors")
    if not A.is_floating_point() or not B.is_floating_point():
        raise fail(path, f"{where}: expected floating-point weights, got {A.dtype} and "
                          f"{B.dtype}")
    rank = A.shape[0]
    if rank < 1:
        raise fail(path, f"{where}: rank 0 (empty lora_A)")
    if tuple(A.shape) != (rank, in_f) or tuple(B.shape) != (out_f, rank):
        raise fail(path, f"{where}: expected lora_A [r, {in_f}] and lora_B [{out_f}, r], got "
                          f"{tuple(A.shape)} and {tuple(B.shape)} (an adapter for another base?)")
    if rank > max_rank:
        raise fail(path, f"{where}: rank {rank} exceeds max_lora_rank {max_rank}")
    module = layout.module_name(layer, proj)
    targets = cfg.get("target_modules")
    if isinstance(targets, list) and not any(module == t or module.endswith("." + t)
                                             for t in targets):
        raise fail(path, f"{where}: has weights but is not among target_modules {targets}")
    want = _pattern_value(cfg["_rank_pattern"], module, cfg["r"])
    if rank != want:
        raise fail(path, f"{where}: lora_A has rank {rank}, the config (r / rank_pattern) says "
                          f"{want}")
    alpha = _pattern_value(cfg["_alpha_pattern"], module, cfg.get("lora_alpha", cfg["r"]))
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    if not math.isfinite(scale) or abs(scale) > FP32_MAX:
        raise fail(path, f"{where}: scale {scale!r} (lora_alpha / r) is not a finite float32")
    return ModuleLora(A=A, B=B, scale=float(scale))  # checked finite in staged.to_pool_form


__all__ = ["AdapterWeights", "ModuleLora", "load_adapter"]
