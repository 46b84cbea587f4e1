"""Registered adapters by name: where their files are, and parsed weights in a host-memory LRU
cache.

Registering parses and validates at once (bad adapters fail at load_lora, never mid-request). An
adapter evicted from the host cache is parsed again from its files when next needed; the files'
stamps (size, modification time) are compared with those taken at registration first, and an
adapter whose files changed is refused (AdapterLoadError, charged to its requests) rather than
served as a mix of two versions: load it again (replace) to take the new files.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from punica.errors import AdapterLoadError, AdapterNotFoundError
from punica.lora.files import FileStamp, stamps_of
from punica.lora.peft import AdapterWeights, load_adapter
from punica.models.arch import ModelArch


@dataclass(frozen=True)
class Source:
    """Where a registered adapter's weights come from."""

    path: str
    """Its directory ("" for weights registered in memory)."""
    root: str | None
    """Every file read for it must resolve below this folder (None: anywhere)."""
    stamps: tuple[FileStamp, ...]
    """Its files' stamps at registration."""


class AdapterRegistry:
    def __init__(self, arch: ModelArch, max_rank: int, max_cached: int,
                 allow_pickle: bool, dtype: torch.dtype | None = None) -> None:
        self.arch, self.max_rank, self.allow_pickle = arch, max_rank, allow_pickle
        self.dtype = dtype
        """The pool's dtype: weights must be finite in it."""
        self.max_cached = max(1, max_cached)
        self.sources: dict[str, Source] = {}
        self._cache: OrderedDict[str, AdapterWeights] = OrderedDict()
        self._in_memory: dict[str, AdapterWeights] = {}  # no path: never evicted

    @property
    def paths(self) -> dict[str, str]:
        return {n: s.path for n, s in self.sources.items()}

    def __contains__(self, name: object) -> bool:
        return name in self.sources

    def __len__(self) -> int:
        return len(self.sources)

    def add(self, name: str, path: str, root: str | None = None) -> AdapterWeights:
        weights = load_adapter(name, path, self.arch, self.max_rank, self.allow_pickle, root,
                               self.dtype)
        self._cache.pop(name, None)
        self._in_memory.pop(name, None)
        self.sources[name] = Source(str(path), root, weights.stamps)
        self._remember(weights)
        return weights

    def add_weights(self, weights: AdapterWeights) -> None:
        """Register weights built in memory (benchmarks, tests)."""
        self._cache.pop(weights.name, None)
        self.sources[weights.name] = Source("", None, ())
        self._in_memory[weights.name] = weights

    def remove(self, name: str) -> None:
        if name not in self.sources:
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded")
        del self.sources[name]
        self._cache.pop(name, None)
        self._in_memory.pop(name, None)

    def get(self, name: str) -> AdapterWeights:
        if name not in self.sources:
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded")
        if name in self._in_memory:
            return self._in_memory[name]
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        src = self.sources[name]
        self._check_unchanged(name, src, stamps_of(Path(src.path)))
        weights = load_adapter(name, src.path, self.arch, self.max_rank, self.allow_pickle,
                               src.root, self.dtype)
        self._check_unchanged(name, src, weights.stamps)
        self._remember(weights)
        return weights

    @staticmethod
    def _check_unchanged(name: str, src: Source, now: tuple[FileStamp, ...]) -> None:
        then = {s.name: s for s in src.stamps}
        if any(then.get(s.name) not in (None, s) for s in now) or \
                not {s.name for s in now} >= set(then):
            raise AdapterLoadError(f"adapter {name!r}: its files at {src.path} changed on disk "
                                   "since it was loaded; load it again to serve the new files")

    def _remember(self, weights: AdapterWeights) -> None:
        self._cache[weights.name] = weights
        self._cache.move_to_end(weights.name)
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)

    def cached(self) -> list[str]:
        return list(self._cache)
