"""Benchmark problems of the LoRA op: pools, rotating inputs and the peers (loop, gather-BMM).

Each case lays out `num_rotations` independent calls (own slots, x, y) whose bytes add up to several
times the L2, so replaying them back to back times every call with cold weights.

Mixed ranks (`Case.rank_mix`): the pool is allocated at the case's rank (the max rank, 64) and each
adapter of a call has its own rank from RANK_CHOICES (S-LoRA's S2 ranks 8, 16, 32, 64; the same
ranks in every rotation, so every call moves the same bytes). "mixed" runs each slot at its own
rank, as Punica's kernels do; "padded" runs the same batch with every slot's rank set to the max,
what a server that pads adapters to max_lora_rank (vLLM) pays. Rows past a slot's own rank are zero
(a padding server's padding); the floor counts only the adapters' own ranks either way.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

import torch

from punica.bench.workloads import indptr_of, segment_lengths
from punica.ops import lora

RANK_CHOICES = (8, 16, 32, 64)  # S-LoRA's S2 ranks: the own ranks of a mixed-rank batch
RANK_MIXES = ("", "mixed", "padded")


@dataclass(frozen=True)
class Case:
    """A batch of `bs` rows under adapter mix `mix`; `rank` is the pool's (max) rank, every
    adapter's rank unless `rank_mix` is "mixed" (each slot at its own rank from RANK_CHOICES) or
    "padded" (the same adapters, every slot run at `rank`)."""

    mix: str
    bs: int
    rank: int
    rank_mix: str = ""

    def __post_init__(self) -> None:
        if self.rank_mix not in RANK_MIXES:
            raise ValueError(f"rank_mix: expected one of {RANK_MIXES}, got {self.rank_mix!r}")

    def __str__(self) -> str:
        """The repr, without rank_mix when there is none (the sweep's case names)."""
        if not self.rank_mix:
            return f"Case(mix={self.mix!r}, bs={self.bs}, rank={self.rank})"
        return repr(self)


def own_ranks(case: Case, num_adapters: int) -> list[int]:
    """Own rank of each adapter of a call, in segment order: `case.rank` for every adapter of a
    one-rank case; for a mixed or padded one, RANK_CHOICES up to `case.rank` in equal shares
    (round robin), shuffled by a fixed seed so rank does not follow popularity."""
    if not case.rank_mix:
        return [case.rank] * num_adapters
    choices = [r for r in RANK_CHOICES if r <= case.rank]
    ranks = [choices[i % len(choices)] for i in range(num_adapters)]
    random.Random(num_adapters).shuffle(ranks)
    return ranks


@dataclass
class Call:
    """One call's inputs: a batch of `bs` rows over its own adapters."""

    x: torch.Tensor
    y: torch.Tensor
    indptr: torch.Tensor
    slots: torch.Tensor
    segments: list[tuple[int, int, int]]  # host copy (start, end, slot) for the loop baseline
    row_slots: torch.Tensor  # [bs] int64, for gather-BMM


@dataclass
class Bench:
    """Pools A / B [num_slots, case.rank, features], `ranks` (int32 [num_slots]: the rank each
    slot runs at, what the kernels read) and `call_ranks` (the own rank of each adapter of a call,
    in segment order, the same in every call)."""

    case: Case
    A: torch.Tensor
    B: torch.Tensor
    ranks: torch.Tensor
    scales: torch.Tensor
    scales_host: list[float]
    calls: list[Call]
    workspace: torch.Tensor
    call_ranks: list[int]
    ranks_host: list[int]

    @property
    def num_adapters(self) -> int:
        return len(self.calls[0].segments)

    def floor_bytes(self, in_f: int, out_f: int, dtype_bytes: int = 2) -> int:
        """Each used adapter's A and B at its own rank read once, x read, y read and written
        (a padded case's floor too: padding is bytes the batch does not need)."""
        weights = sum(self.call_ranks) * (in_f + out_f)
        acts = self.case.bs * (in_f + 2 * out_f)
        return (weights + acts) * dtype_bytes

    def padding_mask(self) -> torch.Tensor:
        """[num_slots, case.rank] bool: the pool rows past each slot's own rank."""
        own = torch.tensor(_slot_own_ranks(self.call_ranks, self.A.shape[0]), device=self.A.device)
        return torch.arange(self.case.rank, device=self.A.device)[None, :] >= own[:, None]

    def fill_padding(self, value: float) -> None:
        """Write `value` into the A and B rows past each slot's own rank (NaN: a kernel that
        honours `ranks` never reads them, so its output stays finite; 0: a padding server's)."""
        pad = self.padding_mask()
        self.A[pad] = value
        self.B[pad] = value


def _slot_own_ranks(call_ranks: list[int], num_slots: int) -> list[int]:
    """Own rank of every slot: call r's adapter i is slot r * len(call_ranks) + i."""
    return [call_ranks[w % len(call_ranks)] for w in range(num_slots)]


def build(case: Case, in_f: int, out_f: int, dtype: torch.dtype, l2_bytes: int,
          device: str = "cuda", max_rotations: int = 128) -> Bench:
    """The case's pools, rotations of calls and workspace (see the module docstring)."""
    lengths = segment_lengths(case.mix, case.bs)
    call_ranks = own_ranks(case, len(lengths))
    per_call = (sum(call_ranks) * (in_f + out_f) + case.bs * (in_f + 2 * out_f)) * 2
    rotations = min(max_rotations, max(4, math.ceil(4 * l2_bytes / per_call)))
    num_slots = rotations * len(lengths)
    dev = torch.device(device)
    A = torch.randn(num_slots, case.rank, in_f, device=dev, dtype=dtype) * in_f**-0.5
    B = torch.randn(num_slots, case.rank, out_f, device=dev, dtype=dtype) * 0.1
    slot_ranks = (_slot_own_ranks(call_ranks, num_slots) if case.rank_mix == "mixed"
                  else [case.rank] * num_slots)
    ranks = torch.tensor(slot_ranks, dtype=torch.int32, device=dev)
    scales = torch.rand(num_slots, device=dev) + 0.5
    calls = []
    for rot in range(rotations):
        slot_ids = list(range(rot * len(lengths), (rot + 1) * len(lengths)))
        bounds = indptr_of(lengths)
        segments = [(bounds[i], bounds[i + 1], w) for i, w in enumerate(slot_ids)]
        row_slots = [w for (s, e, w) in segments for _ in range(e - s)]
        calls.append(Call(
            x=torch.randn(case.bs, in_f, device=dev, dtype=dtype),
            y=torch.randn(case.bs, out_f, device=dev, dtype=dtype),
            indptr=torch.tensor(bounds, dtype=torch.int32, device=dev),
            slots=torch.tensor(slot_ids, dtype=torch.int32, device=dev),
            segments=segments,
            row_slots=torch.tensor(row_slots, dtype=torch.int64, device=dev),
        ))
    workspace = torch.zeros(lora.workspace_numel(case.bs, case.rank), device=dev)
    bench = Bench(case, A, B, ranks, scales, scales.tolist(), calls, workspace, call_ranks,
                  slot_ranks)
    if case.rank_mix:
        bench.fill_padding(0.0)
    return bench


def ours(b: Bench, c: Call, shrink: lora.ShrinkConfig | None = None,
         expand: lora.ExpandConfig | None = None, reduce: bool = False,
         pdl: bool = True) -> None:
    """Punica's SGMV: shrink + expand (default launch configs unless given; `reduce`: the
    partials summed inside the shrink; `pdl=False`: neither kernel launched with programmatic
    dependent launch, the default configs otherwise)."""
    if not pdl:
        T, R = c.x.shape[0], b.A.shape[1]
        shrink = dataclasses.replace(
            shrink or lora.shrink_config(T, c.slots.numel(), c.x.shape[1], R), use_pdl=False)
        expand = dataclasses.replace(
            expand or lora.expand_config(T, c.slots.numel(), c.y.shape[1], R), use_pdl=False)
    if expand is None and (shrink is None or reduce):
        if reduce:
            T, R = c.x.shape[0], b.A.shape[1]
            shrink = dataclasses.replace(
                shrink or lora.shrink_config(T, c.slots.numel(), c.x.shape[1], R), reduce=True)
        lora.add_lora(c.y, c.x, b.A, b.B, c.indptr, c.slots, b.ranks, b.scales, b.workspace,
                      shrink=shrink)
        return
    T = c.x.shape[0]
    shrink = shrink or lora.shrink_config(T, c.slots.numel(), c.x.shape[1], b.A.shape[1])
    expand = expand or dataclasses.replace(
        lora.expand_config(T, c.slots.numel(), c.y.shape[1], b.A.shape[1]), use_pdl=None)
    v = b.workspace[: shrink.num_splits * T * b.A.shape[1]].view(shrink.num_splits, T, -1)
    lora.sgmv_shrink(c.x, b.A, c.indptr, c.slots, b.ranks, v, shrink)
    lora.sgmv_expand(v, b.B, c.indptr, c.slots, b.ranks, b.scales, c.y, expand)


def loop(b: Bench, c: Call) -> None:
    """Peer: a Python loop over adapters, two matmuls each at the slot's rank (`b.ranks`)."""
    for start, end, w in c.segments:
        r = b.ranks_host[w]
        c.y[start:end] += b.scales_host[w] * ((c.x[start:end] @ b.A[w, :r].T) @ b.B[w, :r])


def gather_bmm(b: Bench, c: Call) -> None:
    """Peer: gather each row's A and B, then two batched matmuls (torch.bmm). It pads by nature:
    every row's weights are gathered at the pool's max rank, whatever the slot's rank (correct
    because the rows past a slot's rank are zero), so mixed and padded cases cost it the same."""
    a = b.A[c.row_slots]  # [bs, r, in]
    bw = b.B[c.row_slots]  # [bs, r, out]
    v = torch.bmm(c.x.unsqueeze(1), a.transpose(1, 2))  # [bs, 1, r]
    scale = b.scales[c.row_slots].to(c.y.dtype)[:, None]
    c.y += torch.bmm(v, bw).squeeze(1) * scale
