"""Adapter files read and converted in loader processes, so that none of that work holds the
engine process's GIL.

Loader threads in the engine's process release the GIL while they read and copy, but parsing and
checking an adapter is Python, and every small torch call of the step thread gives the GIL away
and must wait to get it back: on the 2-core CPU machine one loader thread reading an 80 MB adapter
in a loop took a 300-op "step" from 1.2 to 17.8 ms at p99, two from 1.2 to 25.6 ms
(`scripts/convoy_probe.py`, `benchmarks/results/convoy_probe_cpu.json`). Here each loader thread
hands its read to a process of its own and waits on a pipe (the GIL released), so the engine
process does only the bookkeeping: a few hundred Python operations per adapter (the same probe:
7.8 and 15.7 ms, the processes still sharing the machine's two cores with the step). Opt-in
(`--lora-loader-processes`) until measured on the GPU.

The weights land in the engine's arena (`PinnedArena(shared=True)`: shared memory, registered
as pinned on CUDA). Life cycle of one read:
    engine process: block = arena.block(estimate)  (one range for the whole adapter)
    -> process: load_adapter carving every pool-form tensor from the block (`Carver`)
    -> reply "ok" + where each tensor lies  -> engine process: views of the arena, AdapterWeights
    -> reply "need" + bytes (the block was too small) -> engine process: release, retry once
    -> reply "error" + why -> release; AdapterLoadError charged to the adapter
    -> the process died (EOF on the pipe) -> release; AdapterLoadError; a new process replaces it
The block is released like any adapter's arena blocks (registry eviction, unload, refused read).
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import queue
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.multiprocessing as mp

from punica.errors import AdapterLoadError
from punica.lora.pinned_arena import ALIGN, ArenaBlocks, PinnedArena
from punica.models.arch import ModelArch

if TYPE_CHECKING:
    from punica.lora.peft import AdapterWeights

log = logging.getLogger(__name__)

WAIT_S = 120.0
"""Longest a loader thread waits for a free process (all busy, or one being replaced)."""

TensorAt = tuple[int, tuple[int, ...]]
"""(byte offset in the arena buffer, shape) of a contiguous tensor in the pool's dtype."""


@dataclass(frozen=True)
class Job:
    name: str
    path: str
    root: str | None
    offset: int
    nbytes: int


class Carver:
    """Pool-form tensors carved one after another from one block of the shared buffer (in a
    loader process). Past the block's end it goes on counting, handing out private memory, so
    that `needed` tells the engine how big a block to give on the retry."""

    def __init__(self, buffer: torch.Tensor, offset: int, nbytes: int) -> None:
        self.buffer, self.start, self.end = buffer, offset, offset + nbytes
        self.pos = offset

    @property
    def needed(self) -> int:
        return self.pos - self.start

    @property
    def overflowed(self) -> bool:
        return self.pos > self.end

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype,
               blocks: ArenaBlocks) -> torch.Tensor:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        at = -(-self.pos // ALIGN) * ALIGN
        self.pos = at + nbytes
        if self.pos > self.end:
            return torch.empty(shape, dtype=dtype)
        return self.buffer[at:at + nbytes].view(dtype).view(shape)

    def release(self, blocks: ArenaBlocks) -> None:
        """The engine process owns the block."""


def _at(t: torch.Tensor, base: int) -> TensorAt:
    assert t.is_contiguous()
    return t.data_ptr() - base, tuple(t.shape)


def _serve(conn: multiprocessing.connection.Connection, buffer: torch.Tensor, arch: ModelArch,
           max_rank: int, allow_pickle: bool, dtype: torch.dtype) -> None:
    """A loader process: load each job into its block until told to stop (None)."""
    from punica.lora.peft import load_adapter
    from punica.lora.read_buffer import use_scratch

    use_scratch()
    base = buffer.data_ptr()
    while (job := conn.recv()) is not None:
        carver = Carver(buffer, job.offset, job.nbytes)
        try:
            w = load_adapter(job.name, job.path, arch, max_rank, allow_pickle, job.root, dtype,
                             pin=True, arena=carver)  # type: ignore[arg-type]
        except AdapterLoadError as err:
            conn.send(("error", str(err)))
            continue
        except Exception as err:  # noqa: BLE001 - any failure is this adapter's
            conn.send(("error", f"adapter at {job.path}: cannot be read "
                                f"({type(err).__name__}: {err})"))
            continue
        if carver.overflowed:
            conn.send(("need", carver.needed))
            continue
        modules = [(key, _at(m.A, base), _at(m.B.T, base), m.scale)
                   for key, m in w.modules.items()]
        stacked = [(proj, _at(s.A, base), _at(s.Bt, base)) for proj, s in w.stacked.items()]
        conn.send(("ok", modules, stacked, w.stamps, carver.needed))


class _Worker:
    def __init__(self, ctx: mp.context.SpawnContext, args: tuple) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, *args), daemon=True,
                                   name="punica-lora-loader")
        self.process.start()
        child.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
        self.conn.close()


class ProcessReader:
    """`load(name, path, root)` for loader threads: the read runs in one of `processes` loader
    processes (started now, in the background: the first read waits for one to come up)."""

    def __init__(self, processes: int, arena: PinnedArena, arch: ModelArch, max_rank: int,
                 allow_pickle: bool, dtype: torch.dtype) -> None:
        if not arena.shared:
            raise ValueError("loader processes need a shared arena (PinnedArena(shared=True))")
        self.arena, self.dtype = arena, dtype
        self._ctx = mp.get_context("spawn")
        self._args = (arena.buffer, arch, max_rank, allow_pickle, dtype)
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._all: list[_Worker] = []
        self._lock = threading.Lock()  # _all, _closed: loader threads replace a dead process
        self._closed = False
        for _ in range(max(1, processes)):
            self._add()
        weakref.finalize(self, ProcessReader._stop_all, self._all)

    def _add(self) -> None:
        with self._lock:
            if self._closed:
                return
            worker = _Worker(self._ctx, self._args)
            self._all.append(worker)
        self._idle.put(worker)

    def estimate(self, path: Path) -> int:  # the registry reserves the same
        """Bytes to ask for first: the weights file's size, scaled to the pool's dtype as if
        the file were 16-bit, plus alignment for every tensor."""
        try:
            size = max((path / n).stat().st_size for n in
                       ("adapter_model.safetensors", "adapter_model.bin")
                       if (path / n).exists())
        except ValueError:
            return ALIGN
        return size * self.dtype.itemsize // 2 + (1 << 20)

    def load(self, name: str, path: str, root: str | None) -> AdapterWeights | None:
        """The adapter's AdapterWeights, or None when the arena has no room for it (the caller
        reads it in its own process). Raises AdapterLoadError."""
        nbytes = self.estimate(Path(path))
        for _ in range(2):
            blocks = ArenaBlocks(self.arena)
            offset = self.arena.block(nbytes, blocks)
            if offset is None:
                return None
            reply = self._run(Job(name, path, root, offset, nbytes), blocks)
            if reply[0] == "ok":
                return self._weights(name, path, reply, blocks)
            blocks.release()
            if reply[0] == "error":
                raise AdapterLoadError(reply[1])
            nbytes = reply[1]
        raise AdapterLoadError(f"adapter at {path}: its size changed while it was read")

    def _run(self, job: Job, blocks: ArenaBlocks) -> tuple:
        try:
            worker = self._idle.get(timeout=WAIT_S)
        except queue.Empty:
            blocks.release()
            raise AdapterLoadError(f"adapter at {job.path}: no loader process became free in "
                                   f"{WAIT_S:.0f} s") from None
        try:
            worker.conn.send(job)
            reply = worker.conn.recv()
        except (EOFError, OSError) as err:
            blocks.release()
            log.error("adapter loader process died reading %s; starting another", job.path)
            with self._lock:
                if worker in self._all:
                    self._all.remove(worker)
            worker.stop()
            self._add()  # (none once closed)
            raise AdapterLoadError(f"adapter at {job.path}: the loader process reading it "
                                   f"died ({type(err).__name__})") from None
        self._idle.put(worker)
        return reply

    def _weights(self, name: str, path: str, reply: tuple,
                 blocks: ArenaBlocks) -> AdapterWeights:
        from punica.lora.peft import AdapterWeights, ModuleLora
        from punica.lora.staged import Stacked

        _, modules, stacked, stamps, used = reply
        self.arena.shrink(blocks.offsets[0], used)  # the estimate's slack goes back
        view = self.arena.view
        weights = AdapterWeights(
            name=name, path=path,
            modules={key: ModuleLora(A=view(*a, self.dtype), B=view(*bt, self.dtype).T,
                                     scale=scale)
                     for key, a, bt, scale in modules},
            stamps=stamps, blocks=blocks,
            stacked={proj: Stacked(A=view(*a, self.dtype), Bt=view(*bt, self.dtype))
                     for proj, a, bt in stacked})
        weakref.finalize(weights, blocks.release)  # as load_adapter: given back if unused
        return weights

    def close(self) -> None:
        with self._lock:
            self._closed = True
            workers, self._all[:] = list(self._all), []
        ProcessReader._stop_all(workers)

    @staticmethod
    def _stop_all(workers: list[_Worker]) -> None:
        for worker in list(workers):
            worker.stop()
        workers.clear()
