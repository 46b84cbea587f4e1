"""One step's batch, built once on the host and uploaded once: shared by every layer.

Rows are the scheduled tokens of all sequences, sequences sorted by adapter slot (then by arrival),
so each adapter's rows are contiguous and fall out as SGMV segments.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from punica.engine.sampling_params import SamplingParams
from punica.engine.scheduler import ScheduledSeq
from punica.engine.sequence import Sequence


@dataclass
class Batch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64: flat KV slot of each row
    cu_seqlens_q: list[int]  # [B + 1] row offsets of the sequences
    seq_lens: list[int]  # [B] context length after this step
    block_tables: list[list[int]]  # [B][blocks]
    logits_rows: torch.Tensor  # [N] int64: rows whose logits are sampled
    sampled: list[ScheduledSeq]  # the N sequences that sample, in logits_rows order
    lora_indptr: torch.Tensor  # [S + 1] int32 segment row offsets
    lora_slots: torch.Tensor  # [S] int32 adapter slot per segment (-1: base)
    order: list[ScheduledSeq]  # all scheduled sequences in row order
    cu_seqlens_q_t: torch.Tensor  # the same three on the device, for the attention kernels
    seq_lens_t: torch.Tensor  # [B] int32
    block_tables_t: torch.Tensor  # [B, max_blocks] int32, zero padded
    decode_only: bool  # every sequence has exactly one query row
    gather_rows: torch.Tensor | None = None
    """[G] int64: rows whose input id is the previous step's sampled token, still on the
    device (async scheduling: the placeholder's position); None when there are none."""
    gather_src: torch.Tensor | None = None
    """[G] int64: for each gather row, its token's index in the previous step's tokens."""

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


def build_batch(scheduled: list[ScheduledSeq], block_tables: Mapping[int, list[int]],
                block_size: int, device: torch.device,
                gather: Mapping[int, int] | None = None) -> Batch:
    """`gather`: seq_id -> index in the previous step's device tokens, for sequences whose last
    output id is the placeholder (engine/inflight.py); that row's id is filled on the device."""
    order = sorted(scheduled, key=lambda s: s.seq.slot)  # stable: arrival order within a slot
    gather = gather or {}
    gather_rows: list[int] = []
    gather_src: list[int] = []
    ids: list[int] = []
    pos: list[int] = []
    slot_map: list[int] = []
    cu = [0]
    seq_lens, tables, rows, sampled = [], [], [], []
    seg_bounds, seg_slots = [0], []
    for s in order:
        table = block_tables[s.seq.seq_id]
        span = range(s.start, s.start + s.num_new_tokens)
        ids.extend(s.seq.all_ids[s.start: s.start + s.num_new_tokens])
        pos.extend(span)
        slot_map.extend(table[p // block_size] * block_size + p % block_size for p in span)
        cu.append(cu[-1] + s.num_new_tokens)
        if ids[-1] < 0:  # the placeholder: the last token of a sequence waiting for it
            if s.seq.seq_id not in gather or s.start + s.num_new_tokens != s.seq.num_tokens:
                raise ValueError(f"sequence {s.seq.seq_id}: a placeholder token with no "
                                 "previous-step token to gather")
            ids[-1] = 0
            gather_rows.append(cu[-1] - 1)
            gather_src.append(gather[s.seq.seq_id])
        seq_lens.append(s.start + s.num_new_tokens)
        tables.append(table)
        if s.samples:
            rows.append(cu[-1] - 1)
            sampled.append(s)
        if seg_slots and seg_slots[-1] == s.seq.slot:
            seg_bounds[-1] = cu[-1]
        else:
            seg_slots.append(s.seq.slot)
            seg_bounds.append(cu[-1])

    pin = device.type == "cuda"  # pinned sources: the copies never wait for a running step

    def as_tensor(values: list[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, pin_memory=pin).to(device, non_blocking=True)

    width = max((len(t) for t in tables), default=0)
    padded = [t + [0] * (width - len(t)) for t in tables]
    return Batch(
        input_ids=as_tensor(ids, torch.int64), positions=as_tensor(pos, torch.int64),
        slot_mapping=as_tensor(slot_map, torch.int64), cu_seqlens_q=cu, seq_lens=seq_lens,
        block_tables=tables, logits_rows=as_tensor(rows, torch.int64), sampled=sampled,
        lora_indptr=as_tensor(seg_bounds, torch.int32), lora_slots=as_tensor(seg_slots,
                                                                              torch.int32),
        order=order,
        cu_seqlens_q_t=as_tensor(cu, torch.int32), seq_lens_t=as_tensor(seq_lens, torch.int32),
        block_tables_t=torch.tensor(padded, dtype=torch.int32, pin_memory=pin).reshape(
            len(tables), width).to(device, non_blocking=True),
        decode_only=all(s.num_new_tokens == 1 for s in order),
        gather_rows=as_tensor(gather_rows, torch.int64) if gather_rows else None,
        gather_src=as_tensor(gather_src, torch.int64) if gather_src else None,
    )


def synthetic_batch(new_tokens: list[int], contexts: list[int], slots: list[int],
                    block_size: int, device: torch.device,
                    first_block: int | None = 0) -> tuple[Batch, int]:
    """A batch of sequences with no requests behind them (benchmarks, memory profiling):
    sequence b has contexts[b] tokens (id 1), the last new_tokens[b] computed this step, adapter
    slot slots[b]. Blocks: consecutive from `first_block`, each sequence its own; None: every
    sequence reads and writes block 0 only (a one-block cache serves any shape). Returns the
    batch and the blocks it spans."""
    scheduled, tables, next_block = [], {}, first_block or 0
    for i, (n, ctx, slot) in enumerate(zip(new_tokens, contexts, slots, strict=True)):
        seq = Sequence(i, f"b{i}", [1] * ctx, SamplingParams(), None, slot=slot)
        blocks = -(-ctx // block_size)
        if first_block is None:
            tables[i] = [0] * blocks
        else:
            tables[i] = list(range(next_block, next_block + blocks))
            next_block += blocks
        scheduled.append(ScheduledSeq(seq, n, ctx - n, True))
    return build_batch(scheduled, tables, block_size, device), next_block
