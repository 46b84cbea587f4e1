"""Model families by Hugging Face architecture name (`config.json`'s `architectures`, else its
`model_type`): a family is one module whose model class registers itself here, plus its oracle
test against HF transformers + PEFT. The loader asks `model_class` which class builds a
checkpoint; an unregistered architecture is refused with the list of those that are."""

from __future__ import annotations

from collections.abc import Callable

from punica.errors import ModelLoadError

_BY_ARCHITECTURE: dict[str, type] = {}
_BY_MODEL_TYPE: dict[str, type] = {}


def register(architectures: tuple[str, ...],
             model_types: tuple[str, ...]) -> Callable[[type], type]:
    """Class decorator: `cls(arch)` builds checkpoints of these architectures / model types."""
    def add(cls: type) -> type:
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


def _load_families() -> None:
    """Import the modules of the built-in families (each registers its class)."""
    import punica.models.llama  # noqa: F401
