"""BlockManager: exact block ids, growth, freeing, capacity."""

from __future__ import annotations

import pytest

from punica.engine.block_manager import BlockManager
from punica.errors import CapacityError


def test_allocates_lowest_free_blocks_and_grows_tables() -> None:
    bm = BlockManager(num_blocks=6, block_size=4)
    assert bm.allocate(1, 5) == [0, 1]
    assert bm.allocate(2, 4) == [2]
    assert bm.allocate(1, 8) == []  # 8 tokens still fit in 2 blocks
    assert bm.allocate(1, 9) == [3]
    assert bm.block_table(1) == [0, 1, 3]
    assert bm.num_free == 2
    bm.free(1)
    assert bm.num_free == 5
    assert bm.allocate(3, 12) == [0, 1, 3]  # freed ids come back lowest first
    bm.free(2)
    bm.free(3)
    assert bm.num_free == 6 and bm.owners() == {}


def test_capacity() -> None:
    bm = BlockManager(num_blocks=2, block_size=16)
    assert bm.can_allocate(1, 32) and not bm.can_allocate(1, 33)
    assert bm.blocks_needed(1, 33) == 3
    with pytest.raises(CapacityError, match="3 blocks needed, 2 free"):
        bm.allocate(1, 33)
    assert bm.num_free == 2


def test_free_unknown_sequence_is_a_no_op() -> None:
    bm = BlockManager(1, 1)
    bm.free(42)
    assert bm.num_free == 1


def test_bad_sizes() -> None:
    with pytest.raises(ValueError):
        BlockManager(0, 16)
