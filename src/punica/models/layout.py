"""A model family's LoRA layout: the projections of a decoder layer that take LoRA deltas, how
they group into the model's fused GEMMs, their module names in Hugging Face / PEFT checkpoints,
and their shapes. A family registers its layout with its class (`registry.register`); the adapter
pool, the PEFT loader, random adapters and benchmarks ask `registry.layout_of(arch)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from punica.models.arch import ModelArch


@dataclass(frozen=True)
class LoraLayout:
    groups: tuple[tuple[str, tuple[str, ...]], ...]
    """(group, projections) in order: the projections of one fused GEMM (they read the same
    input and write side by side into its output), whose deltas run as one sliced add_lora."""
    modules: tuple[tuple[str, str], ...]
    """(projection, its module path inside a decoder layer), e.g. ("q", "self_attn.q_proj")."""
    shape: Callable[[ModelArch, str], tuple[int, int]]
    """shape(arch, projection): its (in_features, out_features) in a model of `arch`."""
    layers: str = "model.layers"
    """The decoder layers' module path: layer i's projections are under f"{layers}.{i}."."""

    def __post_init__(self) -> None:
        projs = [p for _, ps in self.groups for p in ps]
        names = [g for g, _ in self.groups]
        if not projs or not all(ps for _, ps in self.groups) or len(set(projs)) != len(projs) \
                or len(set(names)) != len(names):
            raise ValueError(f"groups: expected non-empty groups of distinct projections under "
                             f"distinct names, got {self.groups}")
        paths = [m for _, m in self.modules]
        if sorted(p for p, _ in self.modules) != sorted(projs) or len(set(paths)) != len(paths):
            raise ValueError(f"modules: expected one distinct module path per projection of "
                             f"{projs}, got {self.modules}")

    @cached_property
    def projections(self) -> tuple[str, ...]:
        """Every projection, group by group: the order of the pool's rank and scale tables."""
        return tuple(p for _, ps in self.groups for p in ps)

    @cached_property
    def index(self) -> dict[str, int]:
        """Position of each projection in `projections`."""
        return {p: i for i, p in enumerate(self.projections)}

    def module(self, proj: str) -> str:
        """The projection's module path inside a decoder layer."""
        return dict(self.modules)[proj]

    def module_name(self, layer: int, proj: str) -> str:
        """Its full module name in the model, e.g. model.layers.0.self_attn.q_proj."""
        return f"{self.layers}.{layer}.{self.module(proj)}"

    def leaf(self, proj: str) -> str:
        """The last component of its module path (what PEFT's target_modules usually name)."""
        return self.module(proj).rsplit(".", 1)[-1]
