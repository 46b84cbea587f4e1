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
    assert lora.shrink_config(64, 64, 4096, 64).num_splits == 4
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


def test_expand_holds_the_whole_rank_and_shrinks_tiles_as_it_grows() -> None:
    assert lora.expand_config(64, 64, 11008, 16) == lora.ExpandConfig(1, 1024, 16, 2)
    assert lora.expand_config(64, 8, 11008, 16) == lora.ExpandConfig(1, 1024, 16, 1)
    assert lora.expand_config(8, 8, 11008, 16) == lora.ExpandConfig(1, 512, 16, 1)
    assert lora.expand_config(32, 32, 11008, 16) == lora.ExpandConfig(1, 1024, 16, 1)
    # register tiles of at most 16 x 1024 (tests/ops/test_kernel_resources.py)
    assert lora.expand_config(64, 64, 11008, 32) == lora.ExpandConfig(1, 512, 32, 2)
    assert lora.expand_config(64, 64, 11008, 64) == lora.ExpandConfig(1, 256, 64, 2)
    assert lora.expand_config(64, 64, 11008, 128) == lora.ExpandConfig(1, 128, 128, 2)
    assert lora.expand_config(512, 32, 11008, 16) == lora.ExpandConfig(16, 256, 16, 5)
    assert lora.expand_config(512, 32, 11008, 32) == lora.ExpandConfig(16, 256, 32, 5)
    assert lora.expand_config(512, 32, 11008, 128) == lora.ExpandConfig(16, 64, 128, 8)
    assert lora.expand_config(512, 1, 11008, 128) == lora.ExpandConfig(64, 64, 128, 3,
                                                                       num_warps=8)
    assert lora.expand_config(512, 32, 11008, 100).block_r == 128
    assert lora.expand_config(4096, 1, 11008, 16).block_n == 128


def test_row_shrink_accumulator_stays_16_x_256() -> None:
    for rank, block_r, block_k in ((8, 16, 256), (16, 16, 256), (32, 32, 128), (64, 64, 64),
                                   (128, 64, 64)):
        cfg = lora.shrink_config(64, 64, 4096, rank)
        assert (cfg.block_m, cfg.block_r, cfg.block_k) == (1, block_r, block_k)


def test_configs_refuse_bad_blocks() -> None:
    with pytest.raises(ValueError, match=r"^block_m: expected 1 or a power of two >= 16"):
        lora.ShrinkConfig(block_m=8, block_r=16, block_k=32, num_splits=1)
    with pytest.raises(ValueError, match=r"^block_r: expected a power of two >= 16"):
        lora.ExpandConfig(block_m=1, block_n=64, block_r=24)
