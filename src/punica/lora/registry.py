"""Registered adapters by name: their paths, and parsed weights in a host-memory LRU cache.

Registering parses and validates at once (bad adapters fail at load_lora, never mid-request). An
adapter evicted from the host cache is parsed again from its path when next needed.
"""

from __future__ import annotations

from collections import OrderedDict

from punica.errors import AdapterNotFoundError
from punica.lora.peft import AdapterWeights, load_adapter
from punica.models.arch import ModelArch


class AdapterRegistry:
    def __init__(self, arch: ModelArch, max_rank: int, max_cached: int,
                 allow_pickle: bool) -> None:
        self.arch, self.max_rank, self.allow_pickle = arch, max_rank, allow_pickle
        self.max_cached = max(1, max_cached)
        self.paths: dict[str, str] = {}
        self._cache: OrderedDict[str, AdapterWeights] = OrderedDict()
        self._in_memory: dict[str, AdapterWeights] = {}  # no path: never evicted

    def __contains__(self, name: object) -> bool:
        return name in self.paths

    def add(self, name: str, path: str) -> AdapterWeights:
        weights = load_adapter(name, path, self.arch, self.max_rank, self.allow_pickle)
        self.paths[name] = str(path)
        self._remember(weights)
        return weights

    def add_weights(self, weights: AdapterWeights) -> None:
        """Register weights built in memory (benchmarks, tests)."""
        self.paths[weights.name] = ""
        self._in_memory[weights.name] = weights

    def remove(self, name: str) -> None:
        if name not in self.paths:
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded")
        del self.paths[name]
        self._cache.pop(name, None)
        self._in_memory.pop(name, None)

    def get(self, name: str) -> AdapterWeights:
        if name not in self.paths:
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded")
        if name in self._in_memory:
            return self._in_memory[name]
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        weights = load_adapter(name, self.paths[name], self.arch, self.max_rank,
                               self.allow_pickle)
        self._remember(weights)
        return weights

    def _remember(self, weights: AdapterWeights) -> None:
        self._cache[weights.name] = weights
        self._cache.move_to_end(weights.name)
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)

    def cached(self) -> list[str]:
        return list(self._cache)
