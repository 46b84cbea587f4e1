"""Registered adapters by name: where their files are, and parsed weights in a host-memory LRU
cache bounded in adapters and in bytes.

Registering with `add` parses and validates at once (bad adapters fail at load_lora, never
mid-request). `add_lazy` registers a folder without reading it (just-in-time adapters named by a
request): its first read validates it, and a failure unregisters it again.

Tiers: disk -> host cache (here) -> GPU slots (lora/slots.py). With a loader (lora/loader.py),
files are read on loader threads, never on the engine thread: `ready(name)` says whether an
adapter's weights are in host memory and, when they are not, starts reading them (a request
waits in the queue meanwhile, holding no KV); `collect()` (engine thread) caches what the loaders
finished and returns the failures, which the engine charges to their adapters. Without a loader,
`get` reads on the caller's thread.

An adapter evicted from the host cache is parsed again from its files when next needed; the files'
stamps (size, modification time) are compared with those taken at registration first, and an
adapter whose files changed is refused (AdapterLoadError, charged to its requests) rather than
served as a mix of two versions: load it again (replace) to take the new files.
"""

from __future__ import annotations

import functools
import itertools
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from punica.errors import AdapterLoadError, AdapterNotFoundError
from punica.lora.files import FileStamp, stamps_of
from punica.lora.loader import AdapterLoader
from punica.lora.loader_process import ProcessReader
from punica.lora.peft import AdapterWeights, load_adapter
from punica.lora.pinned_arena import PinnedArena
from punica.models.arch import ModelArch


@dataclass(frozen=True)
class Source:
    """Where a registered adapter's weights come from."""

    path: str
    """Its directory ("" for weights registered in memory)."""
    root: str | None
    """Every file read for it must resolve below this folder (None: anywhere)."""
    stamps: tuple[FileStamp, ...] | None
    """Its files' stamps at registration (None: registered lazily, not read yet)."""
    serial: int = 0
    """Which registration of the name this is: a read started for an earlier one (unloaded or
    replaced since) is discarded when collected, never credited to this one."""


def weights_bytes(weights: AdapterWeights) -> int:
    """Host bytes of an adapter's tensors."""
    return sum(t.numel() * t.element_size() for m in weights.modules.values()
               for t in (m.A, m.B))


class AdapterRegistry:
    def __init__(self, arch: ModelArch, max_rank: int, max_cached: int,
                 allow_pickle: bool, dtype: torch.dtype | None = None,
                 max_cached_bytes: int | None = None,
                 loader: AdapterLoader | None = None, pin: bool = False,
                 arena: PinnedArena | None = None) -> None:
        self.arch, self.max_rank, self.allow_pickle = arch, max_rank, allow_pickle
        self.dtype, self.pin = dtype, pin
        """The pool's dtype (weights must be finite in it and are kept in it), and whether
        weights read are kept in pinned memory (a pool on CUDA)."""
        self.arena = arena
        """Where pinned weights are carved from (their blocks are given back when the host
        copy is dropped: evicted, replaced, unloaded, or a stale read discarded)."""
        self.max_cached = max(1, max_cached)
        self.max_cached_bytes = max_cached_bytes
        """Host cache bound in bytes (None: adapters only); the newest entry always stays."""
        self.loader = loader
        self.reader: ProcessReader | None = None
        """Where a loader thread's reads run when set (loader processes); an adapter the
        shared arena has no room for is read on the thread itself."""
        self.sources: dict[str, Source] = {}
        self._cache: OrderedDict[str, AdapterWeights] = OrderedDict()
        self._cached_bytes = 0
        self._in_memory: dict[str, AdapterWeights] = {}  # no path: never evicted
        self._reading: dict[str, Source] = {}
        """Adapters a loader reads for their current registration."""
        self._reserved: dict[str, int] = {}
        self._reserved_bytes = 0
        """Host bytes the reads in flight are expected to take (their weights files' sizes):
        room made in the cache before a read starts, so that the loader finds the pinned arena
        free for it rather than falling back to pageable memory, whose slot fill the engine
        thread would then wait for."""
        self._serials = itertools.count(1)
        self.protected: Callable[[], set[str]] = set
        """Adapters whose host copy must not be evicted (the engine: those of queued requests,
        so that a prefetch never evicts what an admissible request needs); the cache exceeds
        its bounds rather than drop them."""
        self.on_read: Callable[[float], None] | None = None
        """Called (engine thread) with the seconds of each successful read from disk."""
        self.stats: Counter[str] = Counter()
        """host_hits, host_misses, disk_loads, load_failures, host_evictions; load_seconds."""

    @property
    def paths(self) -> dict[str, str]:
        return {n: s.path for n, s in self.sources.items()}

    def __contains__(self, name: object) -> bool:
        return name in self.sources

    def __len__(self) -> int:
        return len(self.sources)

    def parse(self, name: str, path: str, root: str | None = None) -> AdapterWeights:
        """Parse and check an adapter folder for this registry (any thread: reads nothing of
        the registry's mutable state)."""
        return load_adapter(name, path, self.arch, self.max_rank, self.allow_pickle, root,
                            self.dtype, self.pin, self.arena)

    def add(self, name: str, path: str, root: str | None = None,
            parsed: AdapterWeights | None = None) -> AdapterWeights:
        """Register the folder at `path`, parsing it now unless `parsed` (from `parse`, on
        another thread) holds its weights already."""
        weights = parsed if parsed is not None else self.parse(name, path, root)
        self._forget(name, keep=weights)
        self.sources[name] = Source(str(path), root, weights.stamps, next(self._serials))
        self._remember(weights)
        return weights

    def add_lazy(self, name: str, path: str, root: str | None = None) -> None:
        """Register a folder without reading it: its first read (`ready` or `get`) validates
        it; a read that fails unregisters it (`collect`)."""
        self._forget(name)
        self.sources[name] = Source(str(path), root, None, next(self._serials))

    def add_weights(self, weights: AdapterWeights) -> None:
        """Register weights built in memory (benchmarks, tests)."""
        self._forget(weights.name)
        self.sources[weights.name] = Source("", None, (), next(self._serials))
        self._in_memory[weights.name] = weights

    def remove(self, name: str) -> None:
        if name not in self.sources:
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded")
        del self.sources[name]
        self._forget(name)

    def _forget(self, name: str, keep: AdapterWeights | None = None) -> None:
        old = self._cache.pop(name, None)
        if old is not None:
            self._cached_bytes -= weights_bytes(old)
            if old is not keep:
                _drop(old)
        self._in_memory.pop(name, None)
        self._reading.pop(name, None)  # a read in flight is discarded when collected
        self._reserved_bytes -= self._reserved.pop(name, 0)

    def ready(self, name: str) -> bool:
        """Whether `name`'s weights are in host memory; if not (and there is a loader), start
        reading them on a loader thread. Unknown names are not ready."""
        if name in self._in_memory or name in self._cache:
            return True
        src = self.sources.get(name)
        if src is None:
            return False
        if self.loader is None:
            return True  # get() reads on the caller's thread
        if name in self._reading or len(self._reading) >= self.max_cached:
            return False  # (reads in flight are bounded by the cache's count and bytes: a
            # queue of cold adapters does not read more than the cache can keep; the others
            # start as these land)
        need = self.reader.estimate(Path(src.path)) if self.reader is not None else \
            expected_bytes(src)
        if self.max_cached_bytes is not None:
            self._evict(set(), need)  # room for it now, before the loader allocates
            if self._reserved_bytes and \
                    self._cached_bytes + self._reserved_bytes + need > self.max_cached_bytes:
                return False  # no room until a read in flight lands
        self._reading[name] = src
        self._reserved[name] = need
        self._reserved_bytes += need
        self.stats["host_misses"] += 1
        self.loader.start((name, src.serial), functools.partial(self._read, name, src))
        return False

    def collect(self) -> list[tuple[str, Exception]]:
        """Engine thread: cache what the loaders finished; return the adapters whose read failed
        (a lazily registered one is unregistered again)."""
        if self.loader is None:
            return []
        failed = []
        for r in self.loader.collect():
            name, serial = r.key
            src = self._reading.get(name)
            if src is None or src.serial != serial or self.sources.get(name) is not src:
                if r.weights is not None:
                    _drop(r.weights)
                continue  # unloaded or replaced while it was read: not this registration's
            del self._reading[name]
            self._reserved_bytes -= self._reserved.pop(name, 0)
            self.stats["load_seconds"] += r.seconds
            if r.error is None and self.on_read is not None:
                self.on_read(r.seconds)
            if r.error is not None:
                self.stats["load_failures"] += 1
                if src.stamps is None:
                    del self.sources[name]
                failed.append((name, r.error))
                continue
            assert r.weights is not None
            self.stats["disk_loads"] += 1
            if src.stamps is None:
                self.sources[name] = replace(src, stamps=r.weights.stamps)
            self._remember(r.weights)
        return failed

    def loading(self) -> list[str]:
        return list(self._reading)

    def get(self, name: str) -> AdapterWeights:
        if name not in self.sources:
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded")
        if name in self._in_memory:
            return self._in_memory[name]
        if name in self._cache:
            self._cache.move_to_end(name)
            self.stats["host_hits"] += 1
            return self._cache[name]
        src = self.sources[name]
        start = time.perf_counter()
        try:
            weights = self._read(name, src)
        except Exception:
            self.stats["load_failures"] += 1
            if src.stamps is None:  # never validated: not kept (a fixed folder is read afresh)
                del self.sources[name]
            raise
        seconds = time.perf_counter() - start
        self.stats["disk_loads"] += 1
        self.stats["load_seconds"] += seconds
        if self.on_read is not None:
            self.on_read(seconds)
        if src.stamps is None:
            self.sources[name] = replace(src, stamps=weights.stamps)
        self._remember(weights)
        return weights

    def _read(self, name: str, src: Source) -> AdapterWeights:
        """Parse and check an adapter's files (any thread: reads nothing of the registry's
        mutable state)."""
        if src.stamps is not None:
            self._check_unchanged(name, src, stamps_of(Path(src.path)))
        weights = None
        if self.reader is not None:
            weights = self.reader.load(name, src.path, src.root)
        if weights is None:
            weights = load_adapter(name, src.path, self.arch, self.max_rank, self.allow_pickle,
                                   src.root, self.dtype, self.pin, self.arena)
        if src.stamps is not None:
            try:
                self._check_unchanged(name, src, weights.stamps)
            except AdapterLoadError:
                _drop(weights)
                raise
        return weights

    @staticmethod
    def _check_unchanged(name: str, src: Source, now: tuple[FileStamp, ...]) -> None:
        then = {s.name: s for s in src.stamps}
        if any(then.get(s.name) not in (None, s) for s in now) or \
                not {s.name for s in now} >= set(then):
            raise AdapterLoadError(f"adapter {name!r}: its files at {src.path} changed on disk "
                                   "since it was loaded; load it again to serve the new files")

    def _remember(self, weights: AdapterWeights) -> None:
        old = self._cache.pop(weights.name, None)
        if old is not None:
            self._cached_bytes -= weights_bytes(old)
            if old is not weights:
                _drop(old)
        self._cache[weights.name] = weights
        self._cached_bytes += weights_bytes(weights)
        self._evict({weights.name})

    def _evict(self, keep: set[str], extra: int = 0) -> None:
        """Evict least recently used entries (never `keep` or `protected()`) while the cache is
        past its count, or its bytes with the reads in flight and `extra` are past its byte
        bound; it stays over a bound when only wanted entries are left."""
        protected = None
        while len(self._cache) > self.max_cached or (
                self.max_cached_bytes is not None and self._cached_bytes
                + self._reserved_bytes + extra > self.max_cached_bytes):
            if protected is None:
                protected = self.protected() | keep
            victim = next((n for n in self._cache if n not in protected), None)
            if victim is None:
                return  # every entry is wanted by a queued request: over the bound for now
            evicted = self._cache.pop(victim)
            self._cached_bytes -= weights_bytes(evicted)
            _drop(evicted)
            self.stats["host_evictions"] += 1

    def close(self) -> None:
        """Stop the loader threads and processes (reads in flight are abandoned)."""
        if self.loader is not None:
            self.loader.shutdown()
        if self.reader is not None:
            self.reader.close()

    @property
    def cached_bytes(self) -> int:
        return self._cached_bytes

    def cached(self) -> list[str]:
        return list(self._cache)


def expected_bytes(src: Source) -> int:
    """Host bytes a read of `src` is expected to take: the size of its weights file (from the
    stamps of its registration, else a stat now; 0 when there is none yet). Exact for weights
    stored in the pool's dtype, twice the need of float32 files read into a 16-bit pool."""
    if src.stamps:
        return sum(s.size for s in src.stamps if s.name != "adapter_config.json")
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        try:
            return os.stat(Path(src.path) / name).st_size
        except OSError:
            continue
    return 0


def _drop(weights: AdapterWeights) -> None:
    """A host copy leaves the registry: its pinned blocks go back to the arena (once the
    copies of its last slot fill have finished)."""
    if weights.blocks is not None:
        weights.blocks.release()


def jit_path(root: str | None, name: str) -> Path | None:
    """The folder of the just-in-time adapter `name` below `root` (a relative path of plain
    parts, nested names such as org/name allowed, holding adapter_config.json), or None: no
    root, a name that is not such a path, or no adapter there. Links are followed and must stay
    below the root; the files are read below it too (load_adapter's root check)."""
    if root is None or not name or len(name) > 512 or "\0" in name or "\\" in name:
        return None
    parts = name.split("/")
    if any(p in ("", ".", "..") or len(p.encode("utf-8", "replace")) > 255 for p in parts):
        return None
    base = Path(root).resolve()
    try:
        target = (base / name).resolve()
        found = (target / "adapter_config.json").is_file()
    except (OSError, RuntimeError, ValueError):
        return None
    if base not in target.parents or not found:
        return None
    return target
