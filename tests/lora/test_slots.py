"""AdapterSlots: slot assignment, pins, LRU eviction order, drop."""

from __future__ import annotations

import pytest

from punica.errors import AdapterInUseError
from punica.lora.slots import Acquired, AdapterSlots


def test_assign_pin_release_evict_in_lru_order() -> None:
    s = AdapterSlots(2)
    assert s.acquire("a") == Acquired(0, True)
    assert s.acquire("b") == Acquired(1, True)
    assert s.acquire("a") == Acquired(0, False)  # resident: no load, refcount 2
    assert s.acquire("c") is None  # both pinned
    s.release("b")
    s.release("a")
    assert s.refcount("a") == 1
    assert s.acquire("c") == Acquired(1, True, evicted="b")
    s.release("a")
    s.release("c")  # LRU now: a (released first), c
    assert s.acquire("d") == Acquired(0, True, evicted="a")
    assert s.resident() == {"c": 1, "d": 0}
    assert s.acquire("c") == Acquired(1, False)
    assert s.pinned() == {"c": 1, "d": 1}


def test_drop_frees_the_slot_unless_pinned() -> None:
    s = AdapterSlots(1)
    s.acquire("a")
    with pytest.raises(AdapterInUseError):
        s.drop("a")
    s.release("a")
    s.drop("a")
    assert s.resident() == {} and s.acquire("b") == Acquired(0, True)


def test_release_without_reference_is_a_bug() -> None:
    s = AdapterSlots(1)
    with pytest.raises(RuntimeError):
        s.release("x")
