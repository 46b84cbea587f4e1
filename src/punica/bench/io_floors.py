"""Host I/O the adapter benchmarks set their figures beside: dropping a file from the page cache
(so a read comes from the disk), how much of it is still cached, the sequential read rate, and
the pinned host-to-device copy rate."""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from pathlib import Path

import torch


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return (s[(len(s) - 1) // 2] + s[len(s) // 2]) / 2


def drop_cached(folder: Path) -> bool:
    """Flush and drop a folder's files from the page cache; False where posix_fadvise is absent."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for f in folder.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def resident_fraction(path: Path) -> float | None:
    """Share of a file's pages in the page cache (mincore), None where that cannot be asked."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
            ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        size = path.stat().st_size
        pages = -(-size // mmap.PAGESIZE)
        with open(path, "rb") as f:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return None
        vec = (ctypes.c_ubyte * pages)()
        rc = libc.mincore(addr, size, vec)
        libc.munmap(addr, size)
        return None if rc != 0 else sum(b & 1 for b in vec) / pages
    except (OSError, AttributeError):
        return None


def read_GBps(path: Path, chunked: bool = False) -> float:
    """Read rate of a file, as it lies now (dropped or cached), in GB/s: one sequential stream,
    or (`chunked`) as the adapter loader reads, in chunks side by side into a scratch buffer."""
    if chunked:
        from punica.lora.files import read_file
        from punica.lora.read_buffer import scratch, use_scratch

        use_scratch()
        start = time.perf_counter()
        found = read_file(path.parent, path.name, None, as_tensor=True, into=scratch)
        assert found is not None
        return len(found[0]) / (time.perf_counter() - start) / 1e9
    buf = bytearray(16 << 20)
    start, total = time.perf_counter(), 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total / (time.perf_counter() - start) / 1e9


def h2d_GBps(nbytes: int, reps: int = 10) -> float:
    """Host-to-device copy rate from pinned memory in GB/s (median of CUDA-event timings)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(reps + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return nbytes / _median(times[2:]) / 1e9
