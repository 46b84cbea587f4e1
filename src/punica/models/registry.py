"""Model families by Hugging Face architecture name (`config.json`'s `architectures`, else its
`model_type`): a family is one module whose model class registers itself here with its LoRA
layout (`layout.LoraLayout`: its projections, their groups, module names and shapes), plus its
oracle test against HF transformers + PEFT. The loader asks `model_class` which class builds a
checkpoint, the adapter pool and the PEFT loader ask `layout_of` where LoRA deltas go; an
unregistered architecture is refused with the list of those that are."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from punica.errors import ModelLoadError

if TYPE_CHECKING:
    from punica.models.arch import ModelArch
    from punica.models.layout import LoraLayout

_BY_ARCHITECTURE: dict[str, type] = {}
_BY_MODEL_TYPE: dict[str, type] = {}
_LAYOUTS: dict[type, LoraLayout] = {}


def register(architectures: tuple[str, ...], model_types: tuple[str, ...],
             layout: LoraLayout | None = None) -> Callable[[type], type]:
    """Class decorator: `cls(arch)` builds checkpoints of these architectures / model types, its
    LoRA deltas laid out as `layout` (default: the layout of the registered class it extends)."""
    def add(cls: type) -> type:
        found = layout if layout is not None else next(
            (_LAYOUTS[base] for base in cls.__mro__[1:] if base in _LAYOUTS), None)
        if found is None:
            raise TypeError(f"{cls.__qualname__}: no LoRA layout (register it with layout=...)")
        _LAYOUTS[cls] = found
        for name in architectures:
            _BY_ARCHITECTURE[name] = cls
        for name in model_types:
            _BY_MODEL_TYPE[name] = cls
        return cls
    return add


def registered() -> list[str]:
    return sorted(_BY_ARCHITECTURE)


def model_class(architectures: tuple[str, ...], model_type: str) -> type:
    """The registered class of the first known architecture, else of the model type."""
    _load_families()
    for name in architectures:
        if name in _BY_ARCHITECTURE:
            return _BY_ARCHITECTURE[name]
    if not architectures and model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    raise ModelLoadError(f"architecture {', '.join(architectures) or model_type!r} is not "
                         f"supported (supported: {', '.join(registered())})")


def layout_of(arch: ModelArch) -> LoraLayout:
    """The LoRA layout of `arch`'s family (registered with its model class)."""
    return _LAYOUTS[model_class(arch.architectures, arch.model_type)]


def _load_families() -> None:
    """Import the modules of the built-in families (each registers its class)."""
    import punica.models.llama  # noqa: F401
