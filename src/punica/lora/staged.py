"""Adapter weights in the form a pool slot takes, made where the files are read (a loader
thread), so that filling a slot on the engine thread is only queueing copies.

Pool form: A [r, in] and B transposed to [r, out], contiguous, in the pool's dtype, and pinned
when the pool is on CUDA (a pinned source makes each copy an asynchronous DMA the host does not
wait for), carved from the engine's pinned arena (`pinned_arena.py`) when it has one. A
projection that an adapter targets in every layer at one rank (the usual PEFT adapter) is
stacked: one A [L, r, in] and one B^T [L, r, out] buffer, each layer's module a view into them,
so a slot fill copies it in two calls instead of 2 x L (`LoraPool.load`). The cast, transpose
and pinning are one copy per tensor, and the finiteness check (in the pool's dtype) is one
min/max pass over each buffer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from punica.lora.files import fail
from punica.lora.pinned_arena import ArenaBlocks, PinnedArena
from punica.models.arch import ModelArch
from punica.models.layout import LoraLayout

Modules = dict[tuple[int, str], "ModuleLora"]  # noqa: F821 - peft.ModuleLora (import cycle)


@dataclass(frozen=True)
class Stacked:
    """One projection of every layer at one rank, in pool form."""

    A: torch.Tensor
    """[num_layers, r, in]"""
    Bt: torch.Tensor
    """[num_layers, r, out]: lora_B transposed."""

    @property
    def rank(self) -> int:
        return int(self.A.shape[1])


def finite(t: torch.Tensor) -> bool:
    """Whether every element is finite (one pass: min and max carry any NaN or infinity)."""
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def to_pool_form(path: Path, modules: Modules, arch: ModelArch, layout: LoraLayout,
                 dtype: torch.dtype | None, pin: bool, arena: PinnedArena | None = None
                 ) -> tuple[Modules, dict[str, Stacked], ArenaBlocks | None]:
    """The modules in pool form (same keys, same order, same scales), the stacked projections
    they are views of, and with an `arena` the blocks they live in (`pin` then means: from the
    arena, pageable past its end). `dtype` None: each module's lora_A dtype. Raises
    AdapterLoadError naming the layer whose weights are not finite in the target dtype."""
    blocks = ArenaBlocks(arena) if arena is not None and pin else None
    alloc = functools.partial(_alloc, pin=pin, blocks=blocks)
    try:
        out, stacked = _convert(path, modules, arch, layout, dtype, alloc)
    except BaseException:
        if blocks is not None:
            blocks.release()
        raise
    return out, stacked, blocks


Alloc = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


def _convert(path: Path, modules: Modules, arch: ModelArch, layout: LoraLayout,
             dtype: torch.dtype | None, alloc: Alloc) -> tuple[Modules, dict[str, Stacked]]:
    from punica.lora.peft import ModuleLora

    layers_of: dict[str, list[int]] = {}
    for layer, proj in modules:
        layers_of.setdefault(proj, []).append(layer)
    out: Modules = {}
    stacked: dict[str, Stacked] = {}
    for proj, layers in layers_of.items():
        mods = [modules[(layer, proj)] for layer in layers]
        target = dtype or mods[0].A.dtype
        uniform = len({m.rank for m in mods}) == 1 and len({m.A.dtype for m in mods}) == 1
        if uniform and sorted(layers) == list(range(arch.num_layers)):
            st = _stack(path, proj, layers, mods, layout, target, alloc)
            stacked[proj] = st
            for layer, m in zip(layers, mods, strict=True):
                out[(layer, proj)] = ModuleLora(A=st.A[layer], B=st.Bt[layer].T, scale=m.scale)
            continue
        for layer, m in zip(layers, mods, strict=True):
            a = alloc(tuple(m.A.shape), target)
            a.copy_(m.A)
            bt = alloc((m.B.shape[1], m.B.shape[0]), target)
            bt.copy_(m.B.T)
            if not (finite(a) and finite(bt)):
                raise _not_finite(path, layout, layer, proj, target)
            out[(layer, proj)] = ModuleLora(A=a, B=bt.T, scale=m.scale)
    return {key: out[key] for key in modules}, stacked


def _stack(path: Path, proj: str, layers: list[int], mods: list, layout: LoraLayout,
           dtype: torch.dtype, alloc: Alloc) -> Stacked:
    r = mods[0].rank
    A = alloc((len(layers), r, mods[0].A.shape[1]), dtype)
    Bt = alloc((len(layers), r, mods[0].B.shape[0]), dtype)
    order = sorted(range(len(layers)), key=layers.__getitem__)  # stacked by layer
    torch.stack([mods[k].A.to(dtype) for k in order], out=A)
    torch.stack([mods[k].B.T.to(dtype) for k in order], out=Bt)
    if not (finite(A) and finite(Bt)):
        bad = next(layer for layer in layers if not (finite(A[layer]) and finite(Bt[layer])))
        raise _not_finite(path, layout, bad, proj, dtype)
    return Stacked(A=A, Bt=Bt)


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, pin: bool,
           blocks: ArenaBlocks | None) -> torch.Tensor:
    if blocks is not None:
        return blocks.arena.tensor(shape, dtype, blocks)
    return torch.empty(shape, dtype=dtype, pin_memory=pin)


def _not_finite(path: Path, layout: LoraLayout, layer: int, proj: str,
                dtype: torch.dtype) -> Exception:
    return fail(path, f"layer {layer} {layout.leaf(proj)}: non-finite weights "
                      f"(in {str(dtype).removeprefix('torch.')})")
