"""Tensor-free KV block manager: which blocks of the one preallocated KV pool each sequence owns.

Block life cycle (the invariant the tests check at the end of every scenario):
    free  --allocate(seq, n_tokens)-->  owned by seq (appended to its block table, in order)
    owned --free(seq)-->                free  (finish, abort or preemption: all of seq's blocks)
A block is owned by at most one sequence; free blocks are handed out lowest id first, so block
tables are deterministic. Token t of a sequence lives in block_table[t // block_size] at offset
t % block_size.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from types import MappingProxyType

from punica.errors import CapacityError


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size: expected >= 1, got {num_blocks}, "
                             f"{block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks))  # a heap (sorted is a valid heap)
        self._tables: dict[int, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def block_table(self, seq_id: int) -> list[int]:
        return self._tables.get(seq_id, [])

    def blocks_needed(self, seq_id: int, num_tokens: int) -> int:
        """Blocks to add so that `num_tokens` tokens of seq fit."""
        return max(0, cdiv(num_tokens, self.block_size) - len(self.block_table(seq_id)))

    def can_allocate(self, seq_id: int, num_tokens: int) -> bool:
        return self.blocks_needed(seq_id, num_tokens) <= self.num_free

    def allocate(self, seq_id: int, num_tokens: int) -> list[int]:
        """Grow seq's table to hold `num_tokens` tokens; returns the new blocks."""
        need = self.blocks_needed(seq_id, num_tokens)
        if need > self.num_free:
            raise CapacityError(f"KV cache: {need} blocks needed, {self.num_free} free")
        new = [heapq.heappop(self._free) for _ in range(need)]
        self._tables.setdefault(seq_id, []).extend(new)
        return new

    def free(self, seq_id: int) -> None:
        for block in self._tables.pop(seq_id, []):
            heapq.heappush(self._free, block)

    @property
    def tables(self) -> Mapping[int, list[int]]:
        """seq id -> its block table (a read-only view; no copy)."""
        return MappingProxyType(self._tables)

    def owners(self) -> dict[int, list[int]]:
        """seq id -> its blocks (a copy, for checks)."""
        return {seq: list(blocks) for seq, blocks in self._tables.items()}
