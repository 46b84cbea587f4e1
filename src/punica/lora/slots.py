"""Tensor-free bookkeeping of the adapter pool's GPU slots: residency, pins and LRU eviction.

Slot life cycle:
    free --acquire(name)--> assigned, pinned, *unfilled* (refcount >= 1; the caller must fill it)
    unfilled --filled(name), after the fill's copies were queued--> resident
    unfilled --the fill failed: the caller finishes every request of the adapter (refcount 0),
               then drop(name)--> free (a failed fill never leaves the slot marked as holding
               the adapter, so no later request reads a half-copied or foreign slot)
    pinned --release(name) until refcount 0--> resident, unpinned (in the LRU list, still loaded)
    unpinned --acquire(same name)--> pinned again, no load
    unpinned --acquire(other name) when no slot is free--> evicted (least recently released first)
                                                            and reassigned: the caller loads
    unpinned --drop(name)--> free
A pinned slot is never evicted; when every slot is pinned, acquire returns None (the request waits).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from punica.errors import AdapterInUseError


@dataclass(frozen=True)
class Acquired:
    slot: int
    needs_load: bool
    """True when the slot was (re)assigned to this adapter: its weights must be copied in."""
    evicted: str | None = None


class AdapterSlots:
    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots: expected >= 1, got {num_slots}")
        self.num_slots = num_slots
        self._slot_of: dict[str, int] = {}
        self._name_of: dict[int, str] = {}
        self._refs: dict[str, int] = {}
        self._lru: OrderedDict[str, None] = OrderedDict()  # unpinned residents, oldest first
        self._unfilled: set[str] = set()  # assigned a slot whose fill has not completed

    def refcount(self, name: str) -> int:
        return self._refs.get(name, 0)

    def acquire(self, name: str) -> Acquired | None:
        if name in self._slot_of:
            self._lru.pop(name, None)
            self._refs[name] = self._refs.get(name, 0) + 1
            return Acquired(self._slot_of[name], needs_load=False)
        free = [s for s in range(self.num_slots) if s not in self._name_of]
        evicted = None
        if free:
            slot = free[0]
        elif self._lru:
            evicted, _ = self._lru.popitem(last=False)
            slot = self._slot_of.pop(evicted)
            del self._name_of[slot]
            self._refs.pop(evicted, None)
        else:
            return None
        self._slot_of[name] = slot
        self._name_of[slot] = name
        self._refs[name] = 1
        self._unfilled.add(name)
        return Acquired(slot, needs_load=True, evicted=evicted)

    def filled(self, name: str) -> None:
        """The fill of `name`'s slot completed (its copies are queued ahead of any reader)."""
        if name not in self._slot_of:
            raise RuntimeError(f"filled: adapter {name!r} holds no slot")
        self._unfilled.discard(name)

    @property
    def num_unfilled(self) -> int:
        """Slots assigned whose fill has not completed (0 between steps)."""
        return len(self._unfilled)

    def unfilled(self) -> set[str]:
        """Adapters assigned a slot whose fill has not completed (admitted this step)."""
        return set(self._unfilled)

    def is_filled(self, name: str) -> bool:
        return name in self._slot_of and name not in self._unfilled

    def release(self, name: str) -> None:
        refs = self._refs.get(name, 0)
        if refs <= 0:
            raise RuntimeError(f"release of adapter {name!r} that holds no reference")
        self._refs[name] = refs - 1
        if refs == 1:
            self._lru[name] = None

    def drop(self, name: str) -> None:
        """Forget a resident, unpinned adapter (after it is removed or reloaded)."""
        if self._refs.get(name, 0) > 0:
            raise AdapterInUseError(f"adapter {name!r} is used by {self._refs[name]} request(s)")
        if name in self._slot_of:
            del self._name_of[self._slot_of.pop(name)]
        self._lru.pop(name, None)
        self._refs.pop(name, None)
        self._unfilled.discard(name)

    def resident(self) -> dict[str, int]:
        """Adapters whose slot holds their weights (filled), by slot."""
        return {n: s for n, s in self._slot_of.items() if n not in self._unfilled}

    def pinned(self) -> dict[str, int]:
        return {n: r for n, r in self._refs.items() if r > 0}
