"""AdapterSlots: slot assignment, pins, LRU eviction order, drop."""

from __future__ import annotations

import pytest

from punica.errors import AdapterInUseError
from punica.lora.slots import Acquired, AdapterSlots


def test_assign_pin_release_evict_in_lru_order() -> None:
    s = AdapterSlots(2)
    assert s.acquire("a") == Acquired(0, True)
    assert s.acquire("b") == Acquired(1, True)
    s.filled("a")
    s.filled("b")
    assert s.acquire("a") == Acquired(0, False)  # resident: no load, refcount 2
    assert s.acquire("c") is None  # both pinned
    s.release("b")
    s.release("a")
    assert s.refcount("a") == 1
    assert s.acquire("c") == Acquired(1, True, evicted="b")
    s.filled("c")
    s.release("a")
    s.release("c")  # LRU now: a (released first), c
    assert s.acquire("d") == Acquired(0, True, evicted="a")
    assert s.resident() == {"c": 1}  # d's fill has not completed
    s.filled("d")
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


def test_a_failed_fill_leaves_the_slot_empty() -> None:
    """acquire assigns a slot; only filled() marks it holding the adapter. A fill that failed
    (the requests released, then drop) leaves the slot free: the next acquire of the same
    adapter is told to load again, and no one reads the slot as holding it meanwhile."""
    s = AdapterSlots(1)
    s.acquire("old")
    s.filled("old")
    s.release("old")
    assert s.acquire("new") == Acquired(0, True, evicted="old")
    assert not s.is_filled("new") and s.resident() == {} and s.unfilled() == {"new"}
    s.release("new")
    s.drop("new")
    assert s.resident() == {} and s.pinned() == {}
    assert s.acquire("new") == Acquired(0, True)
    assert not s.is_filled("new")
    s.filled("new")
    assert s.is_filled("new") and s.resident() == {"new": 0} and s.unfilled() == set()
    with pytest.raises(RuntimeError):
        s.filled("other")


def test_release_without_reference_is_a_bug() -> None:
    s = AdapterSlots(1)
    with pytest.raises(RuntimeError):
        s.release("x")
