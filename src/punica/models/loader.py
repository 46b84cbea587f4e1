"""Load a Hugging Face checkpoint directory (config.json + *.safetensors, sharded index too)
into `CausalLM`, one tensor at a time (cast and moved as read: never two copies of the model; the
q/k/v and gate/up weights are then concatenated into the model's fused projections, one layer's
worth of extra memory at a time)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm import tqdm

from punica.errors import ModelLoadError
from punica.models.arch import ModelArch, load_arch
from punica.models.llama import FUSED_PROJECTIONS, CausalLM
from punica.models.registry import model_class

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def resolve_dtype(dtype: str, model_dir: Path) -> torch.dtype:
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ModelLoadError(f"dtype: expected auto, {', '.join(DTYPES)}; got {dtype!r}")
        return DTYPES[dtype]
    cfg = json.loads((model_dir / "config.json").read_text())
    return DTYPES.get(str(cfg.get("torch_dtype") or cfg.get("dtype") or "float16"),
                      torch.float16)


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [model_dir / n for n in names]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir}: no *.safetensors weights (pickle checkpoints are "
                             "not loaded)")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ModelLoadError(f"{model_dir}: shards missing: {missing}")
    return files


def _read(files: list[Path], wanted: set[str], dtype: torch.dtype, device: torch.device,
          progress: bool) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    state: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(wanted), desc="loading weights", unit="tensor", disable=not progress)
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if key.endswith(IGNORED_SUFFIXES):
                        continue
                    if key not in wanted:
                        raise ModelLoadError(f"{path.name}: unexpected weight {key!r}")
                    state[key] = f.get_tensor(key).to(device=device, dtype=dtype)
                    bar.update()
        except (SafetensorError, OSError) as err:
            raise ModelLoadError(f"{path}: corrupt or truncated safetensors ({err})") from err
    bar.close()
    return state


def load_model(model_dir: str | Path, dtype: str = "auto", device: str | torch.device = "cpu",
               progress: bool | None = None) -> tuple[CausalLM, ModelArch, torch.dtype]:
    path = Path(model_dir)
    arch = load_arch(path)
    torch_dtype = resolve_dtype(dtype, path)
    device = torch.device(device)
    cls = model_class(arch.architectures, arch.model_type)
    with torch.device("meta"):
        model = cls(arch)
    wanted = checkpoint_keys(model.state_dict().keys())
    files = weight_files(path)
    total = sum(f.stat().st_size for f in files)
    state = _read(files, wanted | {"lm_head.weight"}, torch_dtype, device,
                  progress if progress is not None else total > 1 << 30)
    if arch.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing = sorted(wanted - state.keys())
    if missing:
        raise ModelLoadError(f"{path}: weights missing from the checkpoint: {missing[:5]}")
    model.load_state_dict(fuse_projections(state), strict=True, assign=True)
    return model.eval(), arch, torch_dtype


def _fused_parts(key: str) -> list[str] | None:
    """The checkpoint keys a fused parameter is made of (None: stored as is)."""
    for fused, parts in FUSED_PROJECTIONS.items():
        marker = f".{fused}."
        if marker in key:
            head, tail = key.split(marker)
            return [f"{head}.{part}.{tail}" for part in parts]
    return None


def checkpoint_keys(model_keys: Iterable[str]) -> set[str]:
    """The names the checkpoint stores the model's parameters under (HF's, unfused)."""
    out: set[str] = set()
    for key in model_keys:
        out.update(_fused_parts(key) or [key])
    return out


def fuse_projections(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenate q/k/v and gate/up rows into the model's fused parameters, in place; each
    layer's parts are freed as soon as its fused tensor exists (one extra layer at a time)."""
    for key in sorted(state):
        for fused, parts in FUSED_PROJECTIONS.items():
            first = f".{parts[0]}."
            if first not in key:
                continue
            head, tail = key.split(first)
            names = [f"{head}.{part}.{tail}" for part in parts]
            state[f"{head}.{fused}.{tail}"] = torch.cat([state.pop(n) for n in names])
    return state
