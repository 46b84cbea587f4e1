"""The adapter weight pool: one preallocated [num_slots, max_rank, features] A and B tensor per
(layer, projection), plus per-slot ranks and scales, indexed by int32 slot.

Loading adapter weights into a slot is one copy per pool (A_pool[slot, :r] = lora_A,
B_pool[slot, :r] = lora_B.T); a projection the adapter does not target gets rank 0 there (the
kernels then leave its rows untouched). Which adapter owns which slot is decided by the
tensor-free AdapterSlots; this class only holds and fills tensors.
"""

from __future__ import annotations

import torch

from punica.lora.peft import AdapterWeights
from punica.models.arch import PROJECTIONS, ModelArch
from punica.ops import lora as lora_ops


class LoraPool:
    def __init__(self, arch: ModelArch, num_slots: int, max_rank: int, max_tokens: int,
                 dtype: torch.dtype, device: torch.device, backend: str = "auto") -> None:
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f"backend: expected auto, triton or torch, got {backend!r}")
        self.num_slots, self.max_rank = num_slots, max_rank
        self.backend = backend
        """auto: Triton kernels on CUDA, torch reference on CPU; torch: the reference anywhere."""
        self.A: list[dict[str, torch.Tensor]] = []
        self.B: list[dict[str, torch.Tensor]] = []
        for _ in range(arch.num_layers):
            a_layer, b_layer = {}, {}
            for proj in PROJECTIONS:
                in_f, out_f = arch.proj_shape(proj)
                a_layer[proj] = torch.zeros(num_slots, max_rank, in_f, dtype=dtype,
                                            device=device)
                b_layer[proj] = torch.zeros(num_slots, max_rank, out_f, dtype=dtype,
                                            device=device)
            self.A.append(a_layer)
            self.B.append(b_layer)
        shape = (arch.num_layers, len(PROJECTIONS), num_slots)
        self.ranks = torch.zeros(shape, dtype=torch.int32, device=device)
        self.scales = torch.zeros(shape, dtype=torch.float32, device=device)
        self.workspace = torch.zeros(lora_ops.workspace_numel(max_tokens, max_rank),
                                     dtype=torch.float32, device=device)

    @property
    def capturable(self) -> bool:
        """Whether add_lora on this pool can be captured in a CUDA graph (the Triton kernels can;
        the torch reference reads ranks on the host)."""
        return self.backend != "torch" and self.A[0][PROJECTIONS[0]].is_cuda

    def load(self, slot: int, adapter: AdapterWeights) -> None:
        ranks = torch.zeros(self.ranks.shape[:2], dtype=torch.int32)
        scales = torch.zeros(self.scales.shape[:2], dtype=torch.float32)
        for (layer, proj), m in adapter.modules.items():
            p = PROJECTIONS.index(proj)
            self.A[layer][proj][slot, : m.rank].copy_(m.A)
            self.B[layer][proj][slot, : m.rank].copy_(m.B.T)
            ranks[layer, p], scales[layer, p] = m.rank, m.scale
        self.ranks[:, :, slot].copy_(ranks)
        self.scales[:, :, slot].copy_(scales)

    def args(self, layer: int, proj: str) -> tuple[torch.Tensor, ...]:
        """(A_pool, B_pool, ranks, scales) for add_lora."""
        p = PROJECTIONS.index(proj)
        return self.A[layer][proj], self.B[layer][proj], self.ranks[layer, p], \
            self.scales[layer, p]
