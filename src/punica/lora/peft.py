"""PEFT LoRA adapters: read `adapter_config.json` + `adapter_model.safetensors`, validate them
against the base model, and return per-module A/B weights with their scales.

Refused with AdapterLoadError and a reason: missing or unreadable files, files that resolve out
of the adapter root or are not regular files, pickle-only weights (unless allowed), configs of
the wrong types (not an object, a non-integer r, an invalid alpha_pattern regex), a non-LoRA
peft_type, DoRA, modules_to_save, fan_in_fan_out, trained biases, target modules outside the
seven projections, shapes that do not match the base (k/v sized for grouped-query attention),
ranks of 0 or above max_lora_rank, 0-d or integer tensors, scales or weights that are not
finite in float32 / the pool's dtype.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import torch

from punica.errors import AdapterLoadError
from punica.models.arch import PROJECTIONS, ModelArch

_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj"
                  r"\.lora_([AB])(?:\.[^.]+)?\.weight$")


MAX_FILE_BYTES = 16 << 30
"""The largest adapter file read (a rank-64 adapter of a 70B model is about 1.7 GB)."""
FP32_MAX = float(torch.finfo(torch.float32).max)


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
    stamps: tuple[FileStamp, ...] = ()
    """The files these weights were read from, as they were then (empty: built in memory)."""

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)


def _fail(path: Path, why: str) -> AdapterLoadError:
    return AdapterLoadError(f"adapter at {path}: {why}")


@dataclass(frozen=True)
class FileStamp:
    """What identifies one version of an adapter file: size and modification time."""

    name: str
    size: int
    mtime_ns: int


def read_file(path: Path, name: str, root: Path | None) -> tuple[bytes, FileStamp] | None:
    """The bytes of `path / name` and their stamp (None: no such file). The file must resolve
    below `root` (when given; symlinks are followed, then checked) and be a regular file: a
    link out of the root, a FIFO or a device is refused, never opened for reading."""
    target = path / name
    if not os.path.lexists(target):
        return None
    try:
        real = target.resolve(strict=True)
    except (OSError, RuntimeError, ValueError) as err:
        raise _fail(path, f"{name} cannot be resolved ({err.__class__.__name__})") from err
    if root is not None and root not in real.parents:
        raise _fail(path, f"{name} resolves outside the adapter root")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError as err:
        raise _fail(path, f"{name} cannot be opened ({err.strerror})") from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _fail(path, f"{name} is not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise _fail(path, f"{name} is {st.st_size} bytes, more than {MAX_FILE_BYTES}")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read()
    except OSError as err:
        raise _fail(path, f"{name} cannot be read ({err.strerror})") from err
    finally:
        os.close(fd)
    return data, FileStamp(name, st.st_size, st.st_mtime_ns)


def stamps_of(path: Path, names: tuple[str, ...] = ("adapter_config.json",
              "adapter_model.safetensors", "adapter_model.bin")) -> tuple[FileStamp, ...]:
    """The stamps of an adapter's files as they are on disk now (no file is read)."""
    out = []
    for name in names:
        try:
            st = os.stat(path / name)
        except OSError:
            continue
        out.append(FileStamp(name, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and \
        math.isfinite(value)


MAX_PATTERNS, MAX_PATTERN_CHARS, MAX_REPEATS = 4096, 256, 3
"""Bounds of an alpha_pattern / rank_pattern: entries, characters per regex, and unbounded
repeats per regex (a module name is short, but k repeats in a row can take n^k steps)."""


def _backtracks(tree: object) -> bool:
    """Whether a parsed regex repeats something that itself repeats or branches (the shapes
    whose matching can take exponential time: (a+)+, (a|a)*)."""
    from re import _constants as c
    from re import _parser

    def inner(items: object, under_repeat: bool) -> bool:
        for op, arg in items:
            if op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT):
                if under_repeat or inner(arg[2], True):
                    return True
            elif op is c.BRANCH:
                if under_repeat or any(inner(b, under_repeat) for b in arg[1]):
                    return True
            elif op in (c.SUBPATTERN, c.ATOMIC_GROUP):
                if inner(arg[-1], under_repeat):
                    return True
            elif op in (c.ASSERT, c.ASSERT_NOT) and inner(arg[1], under_repeat):
                return True
        return False

    def repeats(items: object) -> int:  # unbounded repeats anywhere: a.*b.*c.* is O(n^3)
        n = 0
        for op, arg in items:
            if op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT):
                n += (arg[1] == c.MAXREPEAT) + repeats(arg[2])
            elif op is c.BRANCH:
                n += sum(repeats(b) for b in arg[1])
            elif op in (c.SUBPATTERN, c.ATOMIC_GROUP):
                n += repeats(arg[-1])
            elif op in (c.ASSERT, c.ASSERT_NOT):
                n += repeats(arg[1])
        return n

    return isinstance(tree, _parser.SubPattern) and (inner(tree, False) or
                                                     repeats(tree) > MAX_REPEATS)


def _patterns(path: Path, cfg: dict, key: str, value_ok: object) -> dict[re.Pattern, object]:
    """A PEFT pattern table, each regex checked: valid, short, and without nested repeats or
    repeated alternations (matched on the engine's thread, a regex must not backtrack for
    long: `(a+)+$` is refused)."""
    from re import _parser

    raw = cfg.get(key) or {}
    if not isinstance(raw, dict) or len(raw) > MAX_PATTERNS:
        raise _fail(path, f"{key}: expected an object of at most {MAX_PATTERNS} entries")
    out = {}
    for pattern, value in raw.items():
        if not value_ok(value):
            raise _fail(path, f"{key}[{pattern!r}]: invalid value {value!r}")
        if len(pattern) > MAX_PATTERN_CHARS:
            raise _fail(path, f"{key}: a pattern of {len(pattern)} characters (at most "
                              f"{MAX_PATTERN_CHARS})")
        try:
            if _backtracks(_parser.parse(pattern)):
                raise _fail(path, f"{key}: {pattern!r} repeats a repetition or an alternation, "
                                  f"or has more than {MAX_REPEATS} unbounded repeats (it could "
                                  "take very long to match)")
            out[re.compile(rf"(?:^|\.){pattern}$")] = value
        except (re.error, RecursionError, OverflowError) as err:
            raise _fail(path, f"{key}: {pattern!r} is not a valid regular expression "
                              f"({err})") from err
    return out


def parse_config(path: Path, data: bytes) -> dict:
    """adapter_config.json's checked content (types and values a LoRA adapter may have)."""
    try:
        cfg = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise _fail(path, f"adapter_config.json is not valid JSON ({err})") from err
    if not isinstance(cfg, dict):
        raise _fail(path, f"adapter_config.json: expected an object, got {type(cfg).__name__}")
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
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise _fail(path, f"r: expected a positive integer, got {r!r}")
    alpha = cfg.get("lora_alpha", r)
    if not _number(alpha):
        raise _fail(path, f"lora_alpha: expected a finite number, got {alpha!r}")
    if not isinstance(cfg.get("use_rslora", False), bool):
        raise _fail(path, f"use_rslora: expected true or false, got {cfg['use_rslora']!r}")
    cfg["_alpha_pattern"] = _patterns(path, cfg, "alpha_pattern", _number)
    cfg["_rank_pattern"] = _patterns(path, cfg, "rank_pattern", lambda v: isinstance(v, int)
                                     and not isinstance(v, bool) and v >= 1)
    targets = cfg.get("target_modules")
    if targets is not None and not isinstance(targets, str) and not (
            isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise _fail(path, f"target_modules: expected a string or a list of strings, got "
                          f"{targets!r}"[:300])
    return cfg


def parse_tensors(path: Path, name: str, data: bytes,
                  allow_pickle: bool) -> dict[str, torch.Tensor]:
    if name == "adapter_model.safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            return load(data)
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise _fail(path, f"adapter_model.safetensors is corrupt or truncated ({err})") from err
    if not allow_pickle:
        raise _fail(path, "only adapter_model.bin (pickle) found; pickle files are refused "
                          "unless explicitly allowed (allow_pickle=True)")
    try:
        tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is the file's
        raise _fail(path, f"adapter_model.bin cannot be read ({err.__class__.__name__})") from err
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor)
                                                for t in tensors.values()):
        raise _fail(path, "adapter_model.bin: expected a dict of tensors")
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
        raise _fail(path, "no adapter_config.json (expected a PEFT adapter directory)")
    cfg = parse_config(path, config[0])
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if name == "adapter_model.bin" and not allow_pickle and \
                os.path.lexists(path / name):
            raise _fail(path, "only adapter_model.bin (pickle) found; pickle files are refused "
                              "unless explicitly allowed (allow_pickle=True)")
        found = read_file(path, name, root)
        if found is not None:
            return cfg, parse_tensors(path, name, found[0], allow_pickle), (config[1], found[1])
    raise _fail(path, "no adapter_model.safetensors")


def load_adapter(name: str, path: str | Path, arch: ModelArch, max_rank: int,
                 allow_pickle: bool = False, root: str | Path | None = None,
                 dtype: torch.dtype | None = None) -> AdapterWeights:
    """Parse and validate a PEFT LoRA adapter for `arch`; weights stay on the CPU.

    `root`: every file read must resolve below it. `dtype`: the pool's dtype, in which the
    weights (and their scale) must stay finite."""
    path = Path(path)
    root = Path(root).resolve() if root is not None else None
    cfg, tensors, stamps = read_adapter_files(path, root, allow_pickle)
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = _KEY.search(key)
        if match is None:
            raise _fail(path, f"weight {key!r} is not a LoRA A/B of q, k, v, o, gate, up or "
                              "down projections (embeddings, lm_head and others are refused)")
        layer, proj, half = int(match[1]), match[2], match[3]
        pair = halves.setdefault((layer, proj), {})
        if half in pair:
            raise _fail(path, f"layer {layer} {proj}_proj: two lora_{half} tensors ({key!r} "
                              "and another)")
        pair[half] = value
    modules = {}
    for (layer, proj), pair in sorted(halves.items()):
        modules[(layer, proj)] = _module(path, cfg, arch, max_rank, layer, proj, pair, dtype)
    if not modules:
        raise _fail(path, "no LoRA weights found")
    return AdapterWeights(name=name, path=str(path), modules=modules, stamps=stamps)


def _module(path: Path, cfg: dict, arch: ModelArch, max_rank: int, layer: int, proj: str,
            pair: dict[str, torch.Tensor], dtype: torch.dtype | None) -> ModuleLora:
    where = f"layer {layer} {proj}_proj"
    if layer >= arch.num_layers:
        raise _fail(path, f"{where}: the base model has {arch.num_layers} layers")
    if set(pair) != {"A", "B"}:
        raise _fail(path, f"{where}: lora_A and lora_B must both be present")
    A, B = pair["A"], pair["B"]
    in_f, out_f = arch.proj_shape(proj)
    if A.dim() != 2 or B.dim() != 2:
        raise _fail(path, f"{where}: expected 2-d lora_A and lora_B, got {A.dim()}-d and "
                          f"{B.dim()}-d tensors")
    if not A.is_floating_point() or not B.is_floating_point():
        raise _fail(path, f"{where}: expected floating-point weights, got {A.dtype} and "
                          f"{B.dtype}")
    rank = A.shape[0]
    if rank < 1:
        raise _fail(path, f"{where}: rank 0 (empty lora_A)")
    if tuple(A.shape) != (rank, in_f) or tuple(B.shape) != (out_f, rank):
        raise _fail(path, f"{where}: expected lora_A [r, {in_f}] and lora_B [{out_f}, r], got "
                          f"{tuple(A.shape)} and {tuple(B.shape)} (an adapter for another base?)")
    if rank > max_rank:
        raise _fail(path, f"{where}: rank {rank} exceeds max_lora_rank {max_rank}")
    module = f"model.layers.{layer}.{'mlp' if proj in ('gate', 'up', 'down') else 'self_attn'}" \
             f".{proj}_proj"
    targets = cfg.get("target_modules")
    if isinstance(targets, list) and not any(module == t or module.endswith("." + t)
                                             for t in targets):
        raise _fail(path, f"{where}: has weights but is not among target_modules {targets}")
    want = _pattern_value(cfg["_rank_pattern"], module, cfg["r"])
    if rank != want:
        raise _fail(path, f"{where}: lora_A has rank {rank}, the config (r / rank_pattern) says "
                          f"{want}")
    alpha = _pattern_value(cfg["_alpha_pattern"], module, cfg.get("lora_alpha", cfg["r"]))
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
    if not math.isfinite(scale) or abs(scale) > FP32_MAX:
        raise _fail(path, f"{where}: scale {scale!r} (lora_alpha / r) is not a finite float32")
    check = dtype or A.dtype
    if not torch.isfinite(A.to(check)).all() or not torch.isfinite(B.to(check)).all():
        raise _fail(path, f"{where}: non-finite weights (in {str(check).removeprefix('torch.')})")
    # Kept in the file's dtype (the pool casts on its one copy): host memory stays small.
    return ModuleLora(A=A.contiguous(), B=B.contiguous(), scale=float(scale))


__all__ = ["AdapterWeights", "ModuleLora", "PROJECTIONS", "load_adapter"]
