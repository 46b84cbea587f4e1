"""The pinned arena: range bookkeeping (exact), tensors carved from it, the pageable fallback,
releases deferred until a fill's copies finish, and the registry giving blocks back."""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import pytest
import torch

from punica.errors import AdapterLoadError
from punica.lora.peft import load_adapter
from punica.lora.peft_writer import save_peft
from punica.lora.pinned_arena import ALIGN, ArenaBlocks, PinnedArena, RangeAllocator
from punica.lora.registry import AdapterRegistry, weights_bytes
from punica.models.random import random_adapter, tiny


def test_ranges_first_fit_aligned_and_coalesced() -> None:
    r = RangeAllocator(10 * ALIGN + 7)
    assert r.capacity == 10 * ALIGN
    a, b, c = r.alloc(1), r.alloc(3 * ALIGN), r.alloc(2 * ALIGN + 1)
    assert (a, b, c) == (0, ALIGN, 4 * ALIGN) and r.used == 7 * ALIGN
    assert r.alloc(4 * ALIGN) is None  # 3 left
    r.free(b)
    assert r.free_ranges() == [(ALIGN, 4 * ALIGN), (7 * ALIGN, 10 * ALIGN)]
    assert r.alloc(2 * ALIGN) == ALIGN  # first fit: the hole
    r.free(ALIGN)
    r.free(a)  # merges with the hole after it
    assert r.free_ranges() == [(0, 4 * ALIGN), (7 * ALIGN, 10 * ALIGN)]
    r.free(c)  # merges on both sides
    assert r.free_ranges() == [(0, 10 * ALIGN)] and r.used == 0
    with pytest.raises(KeyError):
        r.free(c)


def test_a_range_shrinks_and_frees_its_tail() -> None:
    r = RangeAllocator(8 * ALIGN)
    a, b = r.alloc(4 * ALIGN), r.alloc(2 * ALIGN)
    r.shrink(a, ALIGN + 1)  # keeps two aligned units, frees the other two
    assert r.used == 4 * ALIGN and r.free_ranges() == [(2 * ALIGN, 4 * ALIGN),
                                                       (6 * ALIGN, 8 * ALIGN)]
    r.shrink(a, 8 * ALIGN)  # never grows
    assert r.used == 4 * ALIGN
    r.free(a)
    r.free(b)
    assert r.free_ranges() == [(0, 8 * ALIGN)] and r.used == 0


class FakeEvent:
    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done


def test_tensors_are_views_fallback_is_pageable_and_release_waits_for_the_fill() -> None:
    arena = PinnedArena(4 * ALIGN)
    blocks = ArenaBlocks(arena)
    t = arena.tensor((2, 64), torch.float16, blocks)  # 256 bytes
    assert t.data_ptr() == arena.buffer.data_ptr() and blocks.offsets == [0]
    u = arena.tensor((3, 64), torch.float32, blocks)  # 768 bytes: the other three ranges
    assert u.data_ptr() == arena.buffer.data_ptr() + ALIGN and arena.ranges.used == 4 * ALIGN
    spill = arena.tensor((4,), torch.float32, blocks)
    assert arena.fallbacks == 1 and blocks.offsets == [0, ALIGN]
    assert not (arena.buffer.data_ptr() <= spill.data_ptr()
                < arena.buffer.data_ptr() + 4 * ALIGN)
    event = FakeEvent()
    blocks.last_fill = event  # type: ignore[assignment]
    blocks.release()
    assert blocks.offsets == [] and arena.ranges.used == 4 * ALIGN  # a copy may still read
    other = ArenaBlocks(arena)
    arena.tensor((1,), torch.float32, other)
    assert arena.fallbacks == 2  # still taken
    event.done = True
    assert arena.tensor((1,), torch.float32, other).data_ptr() == arena.buffer.data_ptr()
    assert arena.ranges.used == ALIGN and other.offsets == [0]


ARCH = tiny(num_layers=2)


def _folder(tmp_path: Path, name: str, seed: int, poison: bool = False) -> Path:
    w = random_adapter(name, ARCH, 4, torch.float32, seed=seed, projections=("q", "o"))
    if poison:
        m = w.modules[(1, "o")]
        bad = m.A.clone()
        bad[0, 0] = float("nan")
        w = dataclasses.replace(w, modules={**w.modules, (1, "o"): dataclasses.replace(m, A=bad)})
    return save_peft(w, ARCH, tmp_path / name)


def test_the_registry_gives_blocks_back_when_a_host_copy_is_dropped(tmp_path: Path) -> None:
    arena = PinnedArena(1 << 20)
    reg = AdapterRegistry(ARCH, 8, max_cached=1, allow_pickle=False, dtype=torch.float16,
                          pin=True, arena=arena)
    a = reg.add("a", str(_folder(tmp_path, "a", 1)))
    assert a.blocks is not None and arena.ranges.used == weights_bytes(a)
    assert all(m.A.data_ptr() - arena.buffer.data_ptr() in range(1 << 20)
               for m in a.modules.values())
    b = reg.add("b", str(_folder(tmp_path, "b", 2)))  # evicts a (one cached adapter)
    assert reg.cached() == ["b"] and arena.ranges.used == weights_bytes(b)
    assert a.blocks.offsets == []
    reg.add("b", str(_folder(tmp_path, "b2", 3)))  # replaced: the old copy's blocks back
    assert b.blocks is not None and b.blocks.offsets == []
    c = reg.add("c", str(_folder(tmp_path, "c", 5)))
    assert reg.add("c", str(tmp_path / "c"), parsed=c) is c  # the cached copy itself, again
    assert c.blocks is not None and c.blocks.offsets and arena.ranges.used == weights_bytes(c)
    reg.remove("b")
    reg.remove("c")
    assert arena.ranges.used == 0
    refused = reg.parse("d", str(_folder(tmp_path, "d", 6)))  # parsed, never registered
    assert arena.ranges.used == weights_bytes(refused)
    del refused
    gc.collect()
    assert arena.ranges.used == 0  # given back when the weights are collected
    with pytest.raises(AdapterLoadError, match="layer 1 o_proj: non-finite"):
        load_adapter("p", _folder(tmp_path, "p", 4, poison=True), ARCH, 8,
                     dtype=torch.float16, pin=True, arena=arena)
    assert arena.ranges.used == 0  # a failed read leaves nothing taken


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_an_engine_reads_adapters_into_its_pinned_arena(tmp_path: Path) -> None:
    from punica.lora.pool import LoraPool

    arena = PinnedArena(8 << 20)
    assert arena.buffer.is_pinned()
    w = random_adapter("w", ARCH, 4, torch.float16, seed=5)
    back = load_adapter("w", save_peft(w, ARCH, tmp_path / "w"), ARCH, 8, dtype=torch.float16,
                        pin=True, arena=arena)
    assert all(st.A.is_pinned() and st.Bt.is_pinned() for st in back.stacked.values())
    pool = LoraPool(ARCH, num_slots=2, max_rank=8, max_tokens=8, dtype=torch.float16,
                    device=torch.device("cuda"))
    pool.load(1, back)
    assert back.blocks is not None and back.blocks.last_fill is not None
    back.blocks.release()
    torch.cuda.synchronize()
    arena.tensor((1,), torch.float16, ArenaBlocks(arena))  # reclaims: the fill has finished
    assert arena.ranges.used == ALIGN
    for (layer, proj), m in w.modules.items():
        group, i, start, width = pool.place[proj]
        assert torch.equal(pool.A[layer][group][1, i * 8: i * 8 + 4].cpu(), m.A)
        assert torch.equal(pool.B[layer][group][1, :4, start:start + width].cpu(), m.B.T)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_a_shared_arena_is_pinned_and_reads_through_loader_processes(tmp_path: Path) -> None:
    """A shared arena (loader processes) is registered as pinned: the weights a process wrote
    into it are pinned views, copied into a slot as they are."""
    from punica.lora.loader_process import ProcessReader
    from punica.lora.pool import LoraPool

    arena = PinnedArena(8 << 20, shared=True)
    assert arena.buffer.is_pinned() and arena.buffer.is_shared()
    w = random_adapter("w", ARCH, 4, torch.float16, seed=5)
    folder = save_peft(w, ARCH, tmp_path / "w")
    reader = ProcessReader(1, arena, ARCH, 8, False, torch.float16)
    try:
        back = reader.load("w", str(folder), None)
    finally:
        reader.close()
    assert back is not None and all(st.A.is_pinned() for st in back.stacked.values())
    pool = LoraPool(ARCH, num_slots=2, max_rank=8, max_tokens=8, dtype=torch.float16,
                    device=torch.device("cuda"))
    pool.load(1, back)
    torch.cuda.synchronize()
    want = load_adapter("w", folder, ARCH, 8, dtype=torch.float16)
    for (layer, proj), m in want.modules.items():
        group, i, start, width = pool.place[proj]
        got = pool.A[layer][group][1, i * 8: i * 8 + m.rank].cpu()
        assert torch.equal(got, m.A)
