"""Pinned host memory for adapter weights, allocated once when the engine starts.

Pinning memory (cudaHostAlloc) is slow and takes the driver's lock: done per adapter on a loader
thread, it stalled the engine thread's launches (on the H200, 100 cold adapters read beside 32
decoding streams made their p99 gap between tokens 11.7x longer). So an engine on CUDA pins one
arena up front and loader threads carve adapters' pool-form tensors out of it
(`staged.to_pool_form`); when it is full they fall back to pageable memory (a slot fill from it
is a slower copy), never to a new pinned allocation.

Life cycle of a block: alloc (loader thread, for one adapter's tensor) -> read by slot fills
(asynchronous copies queued on the engine thread; each fill records an event after its copies,
`ArenaBlocks.used`) -> released when the registry drops the adapter's host copy -> reusable once
the last fill's copies have finished (its event has completed; checked at the next alloc), so a
copy in flight never reads memory that a new adapter is written into.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

import torch

ALIGN = 256


class RangeAllocator:
    """First-fit byte ranges in [0, capacity), each ALIGN-aligned; no tensors (tested exactly).
    Free ranges are kept sorted and coalesced."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity: expected >= 0, got {capacity}")
        self.capacity = capacity - capacity % ALIGN
        self._free: list[tuple[int, int]] = [(0, self.capacity)] if self.capacity else []
        self._size: dict[int, int] = {}

    @property
    def used(self) -> int:
        return sum(self._size.values())

    def alloc(self, nbytes: int) -> int | None:
        """The offset of a free range of `nbytes` (rounded up to ALIGN), or None."""
        size = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        for i, (start, end) in enumerate(self._free):
            if end - start >= size:
                if end - start == size:
                    del self._free[i]
                else:
                    self._free[i] = (start + size, end)
                self._size[start] = size
                return start
        return None

    def shrink(self, offset: int, nbytes: int) -> None:
        """Keep the first `nbytes` (rounded up to ALIGN) of the range at `offset`; free the
        rest."""
        size = self._size[offset]
        keep = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        if keep < size:
            self._size[offset] = keep
            self._size[offset + keep] = size - keep
            self.free(offset + keep)

    def free(self, offset: int) -> None:
        size = self._size.pop(offset)
        i = bisect.bisect(self._free, (offset, offset))
        start, end = offset, offset + size
        if i < len(self._free) and self._free[i][0] == end:  # merge the next range
            end = self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][1] == start:  # and the previous one
            start = self._free[i - 1][0]
            self._free[i - 1] = (start, end)
        else:
            self._free.insert(i, (start, end))

    def free_ranges(self) -> list[tuple[int, int]]:
        return list(self._free)


class PinnedArena:
    """One pinned uint8 buffer and its ranges; thread-safe (loaders allocate, the engine
    thread releases)."""

    def __init__(self, nbytes: int, shared: bool = False) -> None:
        """`shared`: in shared memory (loader processes write adapters into it), pinned on
        CUDA by registering it (cudaHostRegister) rather than by allocating it pinned."""
        self.ranges = RangeAllocator(nbytes)
        self.shared = shared
        cuda = torch.cuda.is_available()
        if shared:
            self.buffer = torch.empty(self.ranges.capacity, dtype=torch.uint8).share_memory_()
            if cuda and self.ranges.capacity:
                rc = torch.cuda.cudart().cudaHostRegister(self.buffer.data_ptr(),
                                                          self.ranges.capacity, 0)
                if int(rc) != 0:
                    raise RuntimeError(f"cudaHostRegister of the shared arena failed ({rc})")
        else:
            self.buffer = torch.empty(self.ranges.capacity, dtype=torch.uint8, pin_memory=cuda)
        self._lock = threading.Lock()
        self._pending: list[tuple[list[int], torch.cuda.Event | None]] = []
        self.fallbacks = 0
        """Tensors that did not fit and went to pageable memory."""

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype,
               blocks: ArenaBlocks) -> torch.Tensor:
        """A tensor carved from the arena (its block recorded in `blocks`), or a pageable one
        when the arena is full."""
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        with self._lock:
            self._reclaim()
            offset = self.ranges.alloc(nbytes)
            if offset is None:
                self.fallbacks += 1
                return torch.empty(shape, dtype=dtype)
        blocks.offsets.append(offset)
        return self.buffer[offset:offset + nbytes].view(dtype).view(shape)

    def block(self, nbytes: int, blocks: ArenaBlocks) -> int | None:
        """The offset of a block of `nbytes` (recorded in `blocks`), None when full: room for
        a whole adapter, which a loader process carves its tensors from."""
        with self._lock:
            self._reclaim()
            offset = self.ranges.alloc(nbytes)
        if offset is not None:
            blocks.offsets.append(offset)
        return offset

    def shrink(self, offset: int, nbytes: int) -> None:
        """Give back the end of a block past its first `nbytes` (what the adapter used)."""
        with self._lock:
            self.ranges.shrink(offset, nbytes)

    def view(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The tensor of `shape` and `dtype` at byte `offset` of the buffer."""
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        return self.buffer[offset:offset + nbytes].view(dtype).view(shape)

    def release(self, blocks: ArenaBlocks) -> None:
        """Give an adapter's blocks back once the copies of its last fill have finished."""
        with self._lock:
            if blocks.offsets:
                self._pending.append((blocks.offsets, blocks.last_fill))
            blocks.offsets = []
            self._reclaim()

    def _reclaim(self) -> None:
        keep = []
        for offsets, event in self._pending:
            if event is None or event.query():
                for offset in offsets:
                    self.ranges.free(offset)
            else:
                keep.append((offsets, event))
        self._pending = keep


@dataclass
class ArenaBlocks:
    """The arena blocks one adapter's host copy lives in, and its last slot fill."""

    arena: PinnedArena
    offsets: list[int] = field(default_factory=list)
    last_fill: torch.cuda.Event | None = None

    def used(self, device: torch.device) -> None:
        """Record (engine thread, after queueing a fill's copies) that a fill reads these
        blocks until `device`'s current stream passes this point."""
        if self.offsets and device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
            self.last_fill = event

    def release(self) -> None:
        self.arena.release(self)


DEFAULT_BYTES = 4 << 30
"""The arena of an engine given neither pinned_lora_bytes nor max_cpu_lora_bytes: about 50
rank-16 adapters on every projection of a 7B model."""


def pinned_arena_of(pinned_bytes: int | None, host_bytes: int | None,
                    device: torch.device, shared: bool = False) -> PinnedArena | None:
    """An engine's arena: on CUDA (or `shared`, for loader processes, on any device),
    `pinned_bytes`, else `host_bytes`, else DEFAULT_BYTES (0: none; adapters read then go to
    pinned memory allocated per adapter, and no loader process can be used)."""
    if device.type != "cuda" and not shared:
        return None
    nbytes = pinned_bytes if pinned_bytes is not None else (host_bytes or DEFAULT_BYTES)
    return PinnedArena(nbytes, shared) if nbytes >= ALIGN else None
