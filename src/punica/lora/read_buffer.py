"""Each loader thread's scratch buffer for the adapter file it is reading.

Reading a file into freshly allocated memory costs a page fault per 4 KiB page, on top of the
copy out of the page cache: a 134 MB adapter took 86 ms into fresh memory and 16 ms into memory
touched before, on the 2-core CI machine. So each thread that reads adapters keeps one buffer,
grown to the largest file it has read (up to MAX_SCRATCH_BYTES; larger files get memory of their
own), and reads every file into it. Only threads that opted in (`use_scratch()`: the loader
threads and loader processes) keep one; any other thread reading an adapter (an explicit load
on a worker thread of the server) gets memory of its own each time, so no idle thread holds a
buffer.

Life cycle of the buffer's contents: `scratch(size)` hands out a view of it -> the file is read
into it -> parsed into views (`safetensors_buffer.parse_safetensors`) -> copied into pool form
(`staged.to_pool_form`, which always allocates its outputs) -> `load_adapter` checks that no
tensor it returns shares the buffer (`assert_not_in_scratch`) -> the next `scratch` call of the
same thread overwrites it. Nothing outlives the load that read it, and no other thread sees the
buffer (it is thread-local), so no lock is needed.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import torch

MAX_SCRATCH_BYTES = 512 << 20
"""Files up to this size reuse the thread's buffer (a rank-64 adapter of a 7B model on all seven
projections is 320 MB); larger ones are read into memory of their own, not kept."""

_local = threading.local()


def use_scratch() -> None:
    """Let this thread keep a scratch buffer (a thread that reads adapters all its life)."""
    _local.enabled = True


def scratch(size: int) -> torch.Tensor:
    """uint8 [size]: a view of this thread's buffer (valid until the thread's next call), or a
    new tensor when `size` is past MAX_SCRATCH_BYTES or the thread did not opt in."""
    if size > MAX_SCRATCH_BYTES or not getattr(_local, "enabled", False):
        return torch.empty(size, dtype=torch.uint8)
    buf: torch.Tensor | None = getattr(_local, "buf", None)
    if buf is None or buf.numel() < size:
        buf = torch.empty(size, dtype=torch.uint8)
        _local.buf = buf
    return buf[:size]


def assert_not_in_scratch(tensors: Iterable[torch.Tensor]) -> None:
    """Raise if any tensor lives in this thread's buffer (a result that would change under its
    owner at the thread's next read)."""
    buf: torch.Tensor | None = getattr(_local, "buf", None)
    if buf is None:
        return
    ptr = buf.untyped_storage().data_ptr()
    for t in tensors:
        if t.untyped_storage().data_ptr() == ptr:
            raise AssertionError("an adapter tensor aliases the loader's scratch buffer")
