"""The adapter weight pool: one preallocated A and B tensor per LoRA group (the projections of
one fused GEMM, as the model's family lays them out: `registry.layout_of(arch)`; for Llama
q/k/v, o, gate/up, down) with the layers outermost, each layer's a contiguous view, plus per-slot
ranks and scales per projection, indexed by int32 slot.

Layout (the sliced add_lora of `ops/lora.py`): a group of S projections with per-projection max
rank R has A [num_slots, S*R, in] (projection i in rows i*R..) and B [num_slots, R, sum(out)]
(projection i in its output columns). Loading adapter weights into a slot is one copy per
projection of all layers when the loader stacked it (A_all[:, slot, i*R : i*R + r] = lora_A of
every layer), else per module: A[slot, i*R : i*R + r] = lora_A, B[slot, :r, cols_i] = lora_B.T;
a projection the
adapter does not target gets rank 0 there (the kernels then skip it; rows past a rank are never
read, so a slot's earlier contents need no clearing). Which adapter owns which slot is decided by
the tensor-free AdapterSlots; this class only holds and fills tensors.
"""

from __future__ import annotations

import torch

from punica.lora.host_stage import HostStage
from punica.lora.peft import AdapterWeights
from punica.models.arch import ModelArch
from punica.models.registry import layout_of
from punica.ops import lora as lora_ops
from punica.ops.checks import MAX_SLICES

HOST_STAGE_BYTES = 4 << 30
"""Pinned host copies of adapter weights kept for fast slot loads (about 50 rank-16 adapters of
a 7B model)."""


class LoraPool:
    def __init__(self, arch: ModelArch, num_slots: int, max_rank: int, max_tokens: int,
                 dtype: torch.dtype, device: torch.device, backend: str = "auto") -> None:
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend: expected auto, triton or torch, got {backend!r}")
        self.num_slots, self.max_rank = num_slots, max_rank
        self.backend = backend
        """auto: Triton kernels on CUDA, torch reference on CPU; torch: the reference anywhere."""
        self.layout = layout = layout_of(arch)
        # proj -> (group, index in the group, first output column, width)
        self.place: dict[str, tuple[str, int, int, int]] = {}
        self.slices: dict[str, tuple[int, ...]] = {}
        """Output widths per group for add_lora (() for a single projection)."""
        self.first: dict[str, int] = {}
        """Index in layout.projections (and the ranks / scales tables) of each group's first
        member."""
        shapes: dict[str, tuple[int, int, int]] = {}
        for group, projs in layout.groups:
            in_fs = {layout.shape(arch, p)[0] for p in projs}
            if len(in_fs) != 1 or len(projs) > MAX_SLICES:
                raise ValueError(f"LoRA group {group} {projs}: expected at most {MAX_SLICES} "
                                 f"projections of one input width, got widths {sorted(in_fs)}")
            widths = [layout.shape(arch, p)[1] for p in projs]
            start = 0
            for i, (proj, width) in enumerate(zip(projs, widths, strict=True)):
                self.place[proj] = (group, i, start, width)
                start += width
            self.slices[group] = tuple(widths) if len(projs) > 1 else ()
            self.first[group] = layout.index[projs[0]]
            shapes[group] = (len(projs), in_fs.pop(), start)
        L = arch.num_layers
        # One tensor per group with the layers outermost: each layer's A / B is a contiguous
        # view, and a slot's stacked projection is one strided region of all layers.
        self.A_all = {g: torch.zeros(L, num_slots, n * max_rank, in_f, dtype=dtype, device=device)
                      for g, (n, in_f, _) in shapes.items()}
        self.B_all = {g: torch.zeros(L, num_slots, max_rank, out_f, dtype=dtype, device=device)
                      for g, (_, _, out_f) in shapes.items()}
        self.A: list[dict[str, torch.Tensor]] = [{g: t[layer] for g, t in self.A_all.items()}
                                                 for layer in range(L)]
        self.B: list[dict[str, torch.Tensor]] = [{g: t[layer] for g, t in self.B_all.items()}
                                                 for layer in range(L)]
        shape = (arch.num_layers, len(layout.projections), num_slots)
        self.ranks = torch.zeros(shape, dtype=torch.int32, device=device)
        self.scales = torch.zeros(shape, dtype=torch.float32, device=device)
        widest = max(len(projs) for _, projs in layout.groups)
        self.workspace = torch.zeros(lora_ops.workspace_numel(max_tokens, max_rank, widest),
                                     dtype=torch.float32, device=device)
        self.dtype = dtype
        self.stage = HostStage(HOST_STAGE_BYTES, pin=self.ranks.is_cuda)

    @property
    def capturable(self) -> bool:
        """Whether add_lora on this pool can be captured in a CUDA graph (the Triton kernels can;
        the torch reference reads ranks on the host)."""
        return self.backend != "torch" and self.ranks.is_cuda

    def load(self, slot: int, adapter: AdapterWeights) -> None:
        """Copy an adapter into `slot`. On a CUDA pool every copy is queued asynchronously
        from pinned memory on the current stream, ahead of the steps that read it; the host
        does not wait for them. A projection the loader stacked in pool form
        (`AdapterWeights.stacked`) is two copies for all layers; any other module is staged
        (`HostStage`) and copied on its own."""
        try:
            self._copy(slot, adapter)
        finally:  # its arena blocks stay taken until the copies queued so far finish
            if adapter.blocks is not None:
                adapter.blocks.used(self.ranks.device)

    def _copy(self, slot: int, adapter: AdapterWeights) -> None:
        pin = self.stage.pin
        ranks = torch.zeros(self.ranks.shape[:2], dtype=torch.int32, pin_memory=pin)
        scales = torch.zeros(self.scales.shape[:2], dtype=torch.float32, pin_memory=pin)
        R = self.max_rank
        stacked = {p: st for p, st in adapter.stacked.items() if self._takes(st.A, st.Bt)}
        for proj, st in stacked.items():
            group, i, start, width = self.place[proj]
            self.A_all[group][:, slot, i * R: i * R + st.rank].copy_(st.A, non_blocking=pin)
            self.B_all[group][:, slot, : st.rank, start:start + width].copy_(st.Bt,
                                                                             non_blocking=pin)
        for (layer, proj), m in adapter.modules.items():
            if proj not in stacked:
                group, i, start, width = self.place[proj]
                a, bt = self.stage.get(m, self.dtype)
                self.A[layer][group][slot, i * R: i * R + m.rank].copy_(a, non_blocking=pin)
                self.B[layer][group][slot, : m.rank, start:start + width].copy_(
                    bt, non_blocking=pin)
            p = self.layout.index[proj]
            ranks[layer, p], scales[layer, p] = m.rank, m.scale
        self.ranks[:, :, slot].copy_(ranks, non_blocking=pin)
        self.scales[:, :, slot].copy_(scales, non_blocking=pin)

    def _takes(self, *host: torch.Tensor) -> bool:
        """Whether host tensors can be copied as they are: the pool's dtype and contiguous
        (pageable ones, past the end of the pinned arena, are copied synchronously rather than
        pinned here on the engine thread)."""
        return all(t.dtype == self.dtype and t.is_contiguous() for t in host)

    def args(self, layer: int, group: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                   torch.Tensor, tuple[int, ...]]:
        """(A_pool, B_pool, ranks, scales, slices) of a LoRA group for add_lora: ranks and
        scales [S, num_slots] for a group of S > 1 projections, else [num_slots]."""
        p, slices = self.first[group], self.slices[group]
        rows = slice(p, p + len(slices)) if slices else p
        return self.A[layer][group], self.B[layer][group], self.ranks[layer, rows], \
            self.scales[layer, rows], slices
