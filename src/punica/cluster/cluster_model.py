"""The cluster as the server sees "the engine": the tokenizer, limits, the adapters every engine
holds, request validation, and adapter loads/unloads that reach every engine.

The server (punica.server.state / app) reads `tokenizer`, `max_model_len`, `registry` and
`validate` and runs adapter calls (`list_loras`, `load_lora`, `remove_lora`) through
`ClusterEngine.call`; these methods block on the engines, so they run on a worker thread.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from punica.cluster.engine_worker import CallResult, EngineInfo
from punica.engine.llm_engine import LLMEngine
from punica.engine.sampling_params import SamplingParams
from punica.engine.stops import StopChecker
from punica.errors import AdapterInUseError, AdapterNotFoundError
from punica.lora.registry import jit_path


class Fleet(Protocol):
    def fan_out(self, fn: Callable[[LLMEngine], object]) -> list[CallResult]: ...

    def adapter_users(self, name: str) -> int: ...


class ClusterModel:
    def __init__(self, fleet: Fleet, info: EngineInfo, tokenizer: object | None) -> None:
        self.fleet = fleet
        self.tokenizer = tokenizer
        self.max_model_len = info.max_model_len
        self.vocab_size = info.vocab_size
        self._stops = StopChecker(None, (), info.max_model_len)
        self._adapters = frozenset(info.adapters)
        self.jit_root = info.jit_root
        """Requests may name folders below it: the engine a request is placed on reads the
        adapter just in time (each engine reads it once, when it first gets one of its
        requests)."""
        self.desired: dict[str, tuple[str, str | None] | None] = dict.fromkeys(info.adapters)
        """The adapters the cluster serves: name -> (path, root) of a load since start, or
        None for one every engine loads when it starts. A restarted engine is made to match."""

    @property
    def registry(self) -> frozenset[str]:
        """Adapters every live engine holds (what requests may name)."""
        return self._adapters

    def validate(self, prompt_ids: list[int], adapter: str | None,
                 params: SamplingParams | None = None) -> None:
        self._stops.validate_prompt(prompt_ids, self.vocab_size, params)
        if adapter is not None and adapter not in self._adapters and \
                jit_path(self.jit_root, adapter) is None:
            raise AdapterNotFoundError(f"adapter {adapter!r} is not loaded")

    def list_loras(self) -> list[str]:
        return sorted(self._adapters)

    def parse_lora(self, name: str, path: str, root: str | None = None) -> None:
        """Nothing here: each engine parses the folder when it loads it (load_lora)."""
        return None

    def load_lora(self, name: str, path: str, root: str | None = None,
                  replace: bool = False, parsed: None = None) -> None:
        """Load on every engine; usable once all have it (a partial load stays unusable).
        `parsed` is always None (parse_lora): the engines read the folder themselves."""
        if replace and self.fleet.adapter_users(name):
            raise AdapterInUseError(f"adapter {name!r} is used by "
                                    f"{self.fleet.adapter_users(name)} request(s); replace it "
                                    "when idle")
        results = self.fleet.fan_out(lambda e: e.load_lora(name, path, root, replace))
        if all(r.error is None for r in results):
            self.desired[name] = (path, root)
        self.refresh()
        _raise_first(results)

    def remove_lora(self, name: str) -> list[str]:
        """Unload from every engine: the adapter's requests there fail (LLMEngine.remove_lora),
        those still queued here fail when placed; returns the ids of those the engines held."""
        if name not in self._adapters:
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded")
        results = self.fleet.fan_out(lambda e: e.remove_lora(name))
        self.desired.pop(name, None)
        self.refresh()
        _raise_first(results)
        return [rid for r in results for rid in (r.value or [])]

    def sync_adapters(self, actor: object) -> None:
        """Make a (re)started engine actor hold `desired`: unload what was unloaded since the
        cluster started, load what was loaded since (blocking: a worker thread)."""
        import ray

        def check(result: CallResult) -> object:
            if result.error is not None:
                raise result.error
            return result.value

        have = check(ray.get(actor.call.remote(lambda e: e.list_loras())))
        for name in have:
            if name not in self.desired:
                check(ray.get(actor.call.remote(lambda e, n=name: e.remove_lora(n))))
        for name, source in self.desired.items():
            if source is not None:
                path, root = source
                check(ray.get(actor.call.remote(
                    lambda e, n=name, p=path, r=root: e.load_lora(n, p, r, True))))

    def refresh(self) -> None:
        listed = [set(r.value) for r in self.fleet.fan_out(lambda e: e.list_loras())
                  if r.error is None]
        self._adapters = frozenset(set.intersection(*listed)) if listed else frozenset()


def _raise_first(results: list[CallResult]) -> None:
    for r in results:
        if r.error is not None:
            raise r.error
