"""Launch heuristics of the SGMV ops: splits, grid bounds and workspace size."""

from __future__ import annotations

import pytest

from punica.ops import lora, lora_config


@pytest.mark.parametrize("num_tokens", [1, 2, 7, 8, 63, 64, 128, 512, 1000, 4096, 8192, 32768])
@pytest.mark.parametrize("in_features", [64, 1024, 4096, 11008, 28672])
def test_splits_fit_the_workspace(num_tokens: int, in_features: int) -> None:
    for num_segments in {1, max(1, num_tokens // 4), num_tokens}:
        cfg = lora.shrink_config(num_tokens, num_segments, in_features, 64)
        assert 1 <= cfg.num_splits <= lora_config.MAX_SPLITS
        assert cfg.num_splits == 1 or in_features // cfg.num_splits >= lora_config.MIN_K_PER_SPLIT
        assert cfg.num_splits * num_tokens * 64 <= lora.workspace_numel(num_tokens, 64)


def test_decode_batch_gets_split_k_and_prefill_does_not() -> None:
    assert lora.shrink_config(1, 1, 4096, 16).num_splits == 16
    assert lora.shrink_config(32, 32, 4096, 16).num_splits == 16
    assert lora.shrink_config(64, 64, 4096, 16).num_splits == 8
    assert lora.shrink_config(128, 128, 4096, 16).num_splits == 4
    assert lora_config.row_shrink_config(64, 64, 4096, 64).num_splits == 4
    assert lora.shrink_config(64, 64, 4096, 64).num_splits == 16  # tile kernel past rank 16
    assert lora.shrink_config(64, 8, 4096, 16).num_splits == 4  # rows share adapters
    assert lora.shrink_config(32, 4, 4096, 16).num_splits == 8
    assert lora.shrink_config(512, 4, 4096, 16).num_splits == 8
    assert lora.shrink_config(8192, 1, 4096, 16).num_splits == 1


def test_row_kernels_take_decode_shaped_batches() -> None:
    for T, S in ((1, 1), (64, 64), (64, 1), (128, 3), (400, 100)):
        assert lora.shrink_config(T, S, 4096, 16).block_m == 1
        assert lora.expand_config(T, S, 4096, 16).block_m == 1
    assert lora.shrink_config(129, 3, 4096, 16).block_m == 64
    assert lora.shrink_config(400, 99, 4096, 16).block_m == 16


DECODE_SHAPES = ((1, 1), (8, 8), (32, 32), (64, 64), (64, 8), (64, 1), (128, 128), (128, 3),
                 (400, 100))


def test_row_kernels_only_up_to_rank_16() -> None:
    """Rank 32, 64 and 128 decode batches go to the tile kernels (H200, bs 64: rank 64 Distinct
    row pair 87.0 us vs tile 46.1; rank 32 Uniform 21.7 vs 13.5); ranks <= ROW_KERNEL_MAX_RANK
    stay on rows."""
    assert lora_config.ROW_KERNEL_MAX_RANK == 16
    for T, S in DECODE_SHAPES:
        for rank in (1, 8, 15, 16):
            assert lora_config.use_row_kernels(T, S, rank)
            assert lora.shrink_config(T, S, 4096, rank).block_m == 1, (T, S, rank)
            assert lora.expand_config(T, S, 11008, rank).block_m == 1, (T, S, rank)
        for rank in (17, 32, 33, 64, 128):
            assert not lora_config.use_row_kernels(T, S, rank)
            assert lora.shrink_config(T, S, 4096, rank).block_m >= 16, (T, S, rank)
            assert lora.expand_config(T, S, 11008, rank).block_m >= 16, (T, S, rank)
    assert lora.shrink_config(64, 64, 4096, 64) == lora.ShrinkConfig(16, 64, 64, 16)
    assert lora.expand_config(64, 64, 11008, 64) == lora.ExpandConfig(16, 128, 64, 8)
    assert lora.shrink_config(64, 64, 4096, 16) == lora.ShrinkConfig(1, 16, 256, 8)
    assert lora_config.row_shrink_config(64, 64, 4096, 32) == lora.ShrinkConfig(1, 32, 128, 4)
    # max_rank is per slice: three rank-16 slices stay on rows, three rank-32 ones do not
    assert lora.shrink_config(64, 64, 4096, 16, 3).block_m == 1
    assert lora.shrink_config(64, 64, 4096, 32, 3).block_m == 16


@pytest.mark.parametrize("rank", (8, 16, 32, 64, 128))
def test_default_shrink_and_expand_pick_the_same_family(rank: int) -> None:
    for T, S in DECODE_SHAPES + ((129, 3), (256, 16), (512, 32), (2048, 1)):
        for slices in (1, 2, 3):
            shrink = lora.shrink_config(T, S, 4096, rank, slices)
            assert (shrink.block_m == 1) == (lora.expand_config(T, S, 4096, rank).block_m == 1)


@pytest.mark.parametrize("rank", (8, 16, 32, 64, 128))
def test_tile_configs_are_the_defaults_off_the_row_kernels(rank: int) -> None:
    shapes = ((512, 32), (512, 1), (2048, 1), (8192, 4), (129, 3), (256, 63))
    if rank > lora_config.ROW_KERNEL_MAX_RANK:
        shapes += DECODE_SHAPES
    for T, S in shapes:
        for slices in (1, 3):
            assert (lora_config.tile_shrink_config(T, S, 4096, rank, slices)
                    == lora.shrink_config(T, S, 4096, rank, slices))
        assert (lora_config.tile_expand_config(T, S, 11008, rank)
                == lora.expand_config(T, S, 11008, rank))
    assert lora_config.tile_shrink_config(64, 64, 4096, 16).block_m == 16  # forced, at rank 16
    assert lora_config.tile_expand_config(64, 64, 11008, 16).block_m == 16


def test_block_m_follows_mean_segment_length() -> None:
    assert lora.shrink_config(256, 63, 4096, 16).block_m == 16
    assert lora.shrink_config(256, 8, 4096, 16).block_m == 32
    assert lora.shrink_config(256, 2, 4096, 16).block_m == 64
    assert lora.shrink_config(256, 16, 4096, 16).block_m == 16
    assert lora.expand_config(2048, 1, 4096, 16).block_m == 64


def test_rank_block_covers_small_and_large_pools() -> None:
    for T in (8, 1024):
        assert lora.shrink_config(T, 8, 4096, 8).block_r == 16
        assert lora.shrink_config(T, 8, 4096, 32).block_r == 32
        assert lora.shrink_config(T, 8, 4096, 128).block_r == 64


def test_small_batches_take_fewer_longer_shrink_splits() -> None:
    """2..8 rows: 8 splits of 512 on 8 warps where 16 of 256 would be the rule (row_probe)."""
    assert lora.shrink_config(8, 8, 4096, 16) == lora.ShrinkConfig(1, 16, 512, 8, num_warps=8)
    assert lora.shrink_config(2, 1, 4096, 16, 3) == lora.ShrinkConfig(1, 16, 512, 8, num_warps=8)
    assert lora.shrink_config(1, 1, 4096, 16) == lora.ShrinkConfig(1, 16, 256, 16)
    assert lora.shrink_config(16, 16, 4096, 16) == lora.ShrinkConfig(1, 16, 256, 16)
    assert lora.shrink_config(8, 8, 1024, 16).num_splits == 4  # K too short for 16: unchanged


def test_expand_holds_the_whole_rank_and_shrinks_tiles_as_it_grows() -> None:
    assert lora.expand_config(64, 64, 11008, 16) == lora.ExpandConfig(1, 1024, 16, 2)
    assert lora.expand_config(64, 8, 11008, 16) == lora.ExpandConfig(1, 1024, 16, 1)
    # up to SMALL_BATCH_ROWS: no prefetch; 1024-column slabs on 8 warps past one row
    assert lora.expand_config(8, 8, 11008, 16) == lora.ExpandConfig(1, 1024, 16, 1, num_warps=8,
                                                                    prefetch=False)
    assert lora.expand_config(1, 1, 11008, 16) == lora.ExpandConfig(1, 512, 16, 1,
                                                                    prefetch=False)
    assert lora.expand_config(9, 9, 11008, 16).prefetch
    assert lora.expand_config(32, 32, 11008, 16) == lora.ExpandConfig(1, 1024, 16, 1)
    # register tiles of at most 16 x 1024 (tests/ops/test_kernel_resources.py)
    assert lora_config.row_expand_config(64, 64, 32) == lora.ExpandConfig(1, 512, 32, 2)
    # rank 32, 64 and 128 rows: reachable by explicit config only (ROW_KERNEL_MAX_RANK)
    assert lora_config.row_expand_config(64, 64, 64) == lora.ExpandConfig(1, 256, 64, 2)
    assert lora_config.row_expand_config(64, 64, 128) == lora.ExpandConfig(1, 128, 128, 2)
    assert lora.expand_config(64, 64, 11008, 128) == lora.ExpandConfig(16, 64, 128, 8,
                                                                       num_warps=8)
    assert lora.expand_config(512, 32, 11008, 16) == lora.ExpandConfig(16, 256, 16, 5)
    assert lora.expand_config(512, 32, 11008, 32) == lora.ExpandConfig(16, 256, 32, 5)
    assert lora.expand_config(512, 32, 11008, 128) == lora.ExpandConfig(16, 64, 128, 8,
                                                                        num_warps=8)
    assert lora.expand_config(512, 1, 11008, 128) == lora.ExpandConfig(64, 64, 128, 3,
                                                                       num_warps=8)
    assert lora.expand_config(512, 32, 11008, 100).block_r == 128
    assert lora.expand_config(4096, 1, 11008, 16).block_n == 128


def test_tile_expand_takes_8_warps_from_2048_element_v_tiles() -> None:
    """16 partial v tiles of 16 x 128 or 32 x 64 fp32 spilled with 4 warps (sm_90 ptxas)."""
    assert lora_config.tile_expand_config(64, 64, 11008, 64).num_warps == 4  # 16 x 64
    assert lora_config.tile_expand_config(32, 1, 11008, 64).num_warps == 8  # 32 x 64
    assert lora_config.tile_expand_config(1, 1, 11008, 128).num_warps == 8  # 16 x 128
    assert lora_config.tile_expand_config(2048, 1, 11008, 16).num_warps == 4  # 64 x 16
    assert lora_config.tile_expand_config(2048, 1, 11008, 32).num_warps == 8  # 64 x 32


def test_row_shrink_accumulator_stays_16_x_256() -> None:
    for rank, block_r, block_k in ((8, 16, 256), (16, 16, 256), (32, 32, 128), (64, 64, 64),
                                   (128, 64, 64)):
        cfg = lora_config.row_shrink_config(64, 64, 4096, rank)
        assert (cfg.block_m, cfg.block_r, cfg.block_k) == (1, block_r, block_k)
        if rank <= lora_config.ROW_KERNEL_MAX_RANK:
            assert lora.shrink_config(64, 64, 4096, rank) == cfg


def test_configs_refuse_bad_blocks() -> None:
    with pytest.raises(ValueError, match=r"^block_m: expected 1 or a power of two >= 16"):
        lora.ShrinkConfig(block_m=8, block_r=16, block_k=32, num_splits=1)
    with pytest.raises(ValueError, match=r"^block_r: expected a power of two >= 16"):
        lora.ExpandConfig(block_m=1, block_n=64, block_r=24)
