"""Decode graphs: a decode batch padded into a bucket's static buffers gives the logits of the
unpadded batch (eager on the CPU via the Triton interpreter; captured and replayed on a GPU)."""

from __future__ import annotations

import pytest
import torch

from punica.bench.rig import Rig
from punica.engine.cuda_graph import StepGraphs
from punica.models.random import tiny
from punica.ops.attention import DecodeSplit


@pytest.mark.parametrize("slots", ([0], [0, 1, 1, -1, 2], [-1, -1, -1]))
def test_padded_decode_equals_unpadded(device: torch.device, slots: list[int]) -> None:
    torch.manual_seed(0)
    rig = Rig.build(tiny(), torch.float32, device, kv_tokens=256, num_slots=3, rank=8,
                    max_tokens=16, attention="triton")
    contexts = [5, 17, 9, 30, 2][: len(slots)]
    batch = rig.batch([1] * len(slots), contexts, slots)
    kv_before = rig.kv_cache.clone()
    want = rig.step(batch, use_lora=True, use_graphs=False)
    kv_after = rig.kv_cache.clone()
    rig.kv_cache.copy_(kv_before)
    graphs = StepGraphs(rig.model, rig.kv_cache, rig.rotary, rig.lora, max_batch=8,
                          max_blocks=4, device=device, capture=device.type == "cuda")
    assert graphs.bucket(len(slots)) == {1: 1, 3: 4, 5: 8}[len(slots)]
    for _ in range(2):  # a second replay reuses the same static buffers
        got = graphs.run(batch)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # The same KV entries were written (the padding rows wrote nothing), with the same values
    # up to the rounding of a matmul of another height.
    assert torch.equal(rig.kv_cache != kv_before, kv_after != kv_before)
    torch.testing.assert_close(rig.kv_cache, kv_after, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("new_tokens,slots", (([1, 5, 1, 3], [0, 0, -1, 2]), ([7], [1]),
                                               ([2, 1, 1, 9, 1], [-1, 1, 1, 2, 2])))
def test_padded_mixed_step_equals_unpadded(device: torch.device, new_tokens: list[int],
                                           slots: list[int]) -> None:
    """Prefill chunks beside decodes, padded into a (token bucket, sequence bucket) graph."""
    torch.manual_seed(1)
    rig = Rig.build(tiny(), torch.float32, device, kv_tokens=256, num_slots=3, rank=8,
                    max_tokens=32, attention="triton")
    contexts = [9, 17, 5, 30, 3][: len(slots)]
    batch = rig.batch(new_tokens, contexts, slots)
    assert not batch.decode_only
    kv_before = rig.kv_cache.clone()
    want = rig.step(batch, use_lora=True, use_graphs=False)
    kv_after = rig.kv_cache.clone()
    rig.kv_cache.copy_(kv_before)
    graphs = StepGraphs(rig.model, rig.kv_cache, rig.rotary, rig.lora, max_batch=8,
                        max_blocks=4, device=device, capture=device.type == "cuda",
                        max_tokens=32)
    tokens, seqs, decode_only, split = graphs.key(batch)
    assert (seqs, decode_only, split) == ({1: 1, 4: 4, 5: 8}[len(slots)], False, False)
    assert tokens == (16 if sum(new_tokens) <= 16 else 32)
    for _ in range(2):
        got = graphs.run(batch)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(rig.kv_cache != kv_before, kv_after != kv_before)
    torch.testing.assert_close(rig.kv_cache, kv_after, rtol=1e-5, atol=1e-5)


def test_refuses_steps_past_the_buckets(device: torch.device) -> None:
    rig = Rig.build(tiny(), torch.float32, device, kv_tokens=256, num_slots=1, rank=8,
                    max_tokens=16, attention="triton")
    graphs = StepGraphs(rig.model, rig.kv_cache, rig.rotary, rig.lora, max_batch=4,
                        max_blocks=4, device=device, capture=False, max_tokens=16)
    assert graphs.key(rig.batch([17], [17], [0])) is None
    assert graphs.key(rig.batch([1] * 5, [2] * 5, [0] * 5)) is None
    with pytest.raises(ValueError, match="decode-only"):
        graphs.run(rig.batch([17], [17], [0]))


def test_keys_cover_every_step_and_warmup_builds_them(device: torch.device) -> None:
    torch.manual_seed(2)
    rig = Rig.build(tiny(), torch.float32, device, kv_tokens=256, num_slots=3, rank=8,
                    max_tokens=32, attention="triton")
    graphs = StepGraphs(rig.model, rig.kv_cache, rig.rotary, rig.lora, max_batch=8,
                        max_blocks=4, device=device, capture=device.type == "cuda",
                        max_tokens=32)
    decode = [(b, b, True, False) for b in (1, 2, 4, 8)]
    mixed = [(t, b, False, False) for t in (16, 32) for b in (1, 2, 4, 8)]
    assert graphs.keys() == decode + mixed
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):  # every step the buckets take has its key among keys()
        n = int(torch.randint(1, 9, (1,), generator=gen))
        new = torch.randint(1, 5, (n,), generator=gen).tolist()
        if sum(new) > 32:
            continue
        batch = rig.batch(new, [c + 8 for c in new], [0] * n)
        assert graphs.key(batch) in graphs.keys()
    kv_before = rig.kv_cache.clone()
    assert graphs.warmup() >= 0.0 and graphs.num_graphs == len(decode + mixed)
    assert torch.equal(rig.kv_cache, kv_before)  # padding rows never write the KV pool
    batch = rig.batch([1, 3], [9, 17], [0, 2])
    want = rig.step(batch, use_lora=True, use_graphs=False)
    rig.kv_cache.copy_(kv_before)
    torch.testing.assert_close(graphs.run(batch), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("contexts,split", (([5, 47, 9, 30, 2], True), ([31, 32, 7], False),
                                            ([33], True)))
def test_split_decode_graph_equals_unsplit(device: torch.device, contexts: list[int],
                                           split: bool) -> None:
    """With a DecodeSplit of 32-token runs, a decode step whose longest context passes 32 takes
    the split graph (keys() has both), and its logits are the unsplit eager step's; the merge
    counters are back at 0 after each replay."""
    torch.manual_seed(3)
    rig = Rig.build(tiny(), torch.float32, device, kv_tokens=256, num_slots=3, rank=8,
                    max_tokens=16, attention="triton")
    a = rig.arch
    decode_split = DecodeSplit.allocate(32, 64, 8, a.num_heads, a.head_dim, device)
    assert decode_split is not None and decode_split.split_tokens == 32
    assert decode_split.workspace.num_splits == 2
    slots = [0, 1, -1, 2, 2][: len(contexts)]
    batch = rig.batch([1] * len(contexts), contexts, slots)
    kv_before = rig.kv_cache.clone()
    want = rig.step(batch, use_lora=True, use_graphs=False)
    rig.kv_cache.copy_(kv_before)
    graphs = StepGraphs(rig.model, rig.kv_cache, rig.rotary, rig.lora, max_batch=8,
                        max_blocks=4, device=device, capture=device.type == "cuda",
                        decode_split=decode_split)
    key = graphs.key(batch)
    assert key is not None and key[3] is split and key in graphs.keys()
    keys = graphs.keys()
    assert [k for k in keys if k[2]] == [(b, b, True, s) for b in (1, 2, 4, 8)
                                         for s in (False, True)]
    assert not any(k[3] for k in keys if not k[2])  # mixed steps never split
    assert graphs.key(batch, split=False)[3] is False and graphs.key(batch, split=True)[3]
    for forced in (None, not split):  # as the DecodeSplit wants, then the other way (benchmarks)
        for _ in range(2):
            rig.kv_cache.copy_(kv_before)
            torch.testing.assert_close(graphs.run(batch, forced), want, rtol=1e-4, atol=1e-4)
            assert int(decode_split.workspace.counters.abs().sum()) == 0


def test_decode_split_sizes_and_choice() -> None:
    cpu = torch.device("cpu")
    assert DecodeSplit.allocate(0, 2048, 32, 4, 16, cpu) is None  # turned off
    assert DecodeSplit.allocate(512, 512, 32, 4, 16, cpu) is None  # one run holds any context
    s = DecodeSplit.allocate(512, 2048, 32, 4, 16, cpu)
    assert s is not None and (s.workspace.num_splits, s.split_tokens) == (4, 512)
    assert tuple(s.workspace.counters.shape) == (32, 4)
    long = DecodeSplit.allocate(512, 32768, 8, 4, 16, cpu)  # at most MAX_SPLITS runs
    assert long is not None and (long.workspace.num_splits, long.split_tokens) == (16, 2048)
    odd = DecodeSplit.allocate(100, 300, 8, 4, 16, cpu)  # runs rounded up to whole key tiles
    assert odd is not None and (odd.workspace.num_splits, odd.split_tokens) == (3, 128)
    assert not s.wanted([512] * 32) and s.wanted([3, 513]) and not s.wanted([])
    assert not s.wanted([600] * 33)  # more sequences than the workspace holds
