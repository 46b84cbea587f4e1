"""The architecture facts Punica needs, read from a Hugging Face `config.json` (via transformers).

Supported: Llama 2/3 (rope_scaling none / linear / llama3), Mistral (no sliding window), Qwen2
(qkv bias, no sliding window) and Qwen3 (q/k RMSNorm). Anything else is refused with a message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from punica.errors import ModelLoadError

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelArch:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, float], ...]
    """Sorted (key, value) pairs of a llama3/linear rope scaling; empty for none."""
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    eos_token_ids: tuple[int, ...]
    architectures: tuple[str, ...] = ()
    """config.json's `architectures` (models/registry.py picks the model class by them)."""

    def proj_shape(self, proj: str) -> tuple[int, int]:
        """(in_features, out_features) of a LoRA projection, as this model's family defines it
        (`registry.layout_of(self).shape`)."""
        from punica.models.registry import layout_of

        return layout_of(self).shape(self, proj)


def _rope(cfg: object) -> tuple[float, tuple[tuple[str, float], ...]]:
    params = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None)
                  or {})
    theta = float(params.pop("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in ("default", None):
        return theta, ()
    if kind not in ("llama3", "linear"):
        raise ModelLoadError(f"rope scaling type {kind!r} is not supported (supported: none, "
                             "linear, llama3)")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    scaling = [("rope_type", 1.0 if kind == "llama3" else 0.0)]
    scaling += [(k, float(params[k])) for k in keys if k in params]
    return theta, tuple(sorted(scaling))


def _check_no_sliding_window(cfg: object) -> None:
    window = getattr(cfg, "sliding_window", None)
    uses = getattr(cfg, "use_sliding_window", window is not None)
    max_pos = getattr(cfg, "max_position_embeddings", 0)
    if uses and window is not None and window < max_pos:
        raise ModelLoadError(f"sliding-window attention (window {window}) is not supported")


def arch_from_config(cfg: object) -> ModelArch:
    model_type = getattr(cfg, "model_type", None)
    if model_type not in SUPPORTED:
        raise ModelLoadError(f"model_type {model_type!r} is not supported (supported: "
                             f"{', '.join(SUPPORTED)})")
    _check_no_sliding_window(cfg)
    if getattr(cfg, "mlp_bias", False):
        raise ModelLoadError("mlp_bias=True is not supported")
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    theta, scaling = _rope(cfg)
    eos = getattr(cfg, "eos_token_id", None)
    eos_ids = tuple(eos) if isinstance(eos, list | tuple) else (() if eos is None else (eos,))
    return ModelArch(
        model_type=model_type, hidden_size=hidden, intermediate_size=cfg.intermediate_size,
        num_layers=cfg.num_hidden_layers, num_heads=heads,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads, head_dim=head_dim,
        vocab_size=cfg.vocab_size, rms_norm_eps=cfg.rms_norm_eps, rope_theta=theta,
        rope_scaling=scaling, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or bool(getattr(cfg, "attention_bias", False)),
        qk_norm=model_type == "qwen3", eos_token_ids=eos_ids,
        architectures=tuple(a for a in (getattr(cfg, "architectures", None) or ())
                            if isinstance(a, str)),
    )


def load_arch(model_dir: str | Path) -> ModelArch:
    from transformers import AutoConfig

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path}: no config.json (expected a Hugging Face model directory)")
    try:
        cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (ValueError, OSError, KeyError) as err:
        raise ModelLoadError(f"{path}/config.json: {err}") from err
    return arch_from_config(cfg)
