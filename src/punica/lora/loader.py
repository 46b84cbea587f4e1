"""Adapter files read off the engine's step thread: a small pool of loader threads parses and
validates an adapter (`load_adapter`), and the engine thread collects the results at its next step
(`collect`). Nothing here touches the registry: the engine thread owns it.

Life cycle of one load: start((name, serial), ...) -> running on a loader thread -> done (weights
or the error) -> collected by the engine thread (the registry caches the weights, or the
adapter's requests fail with the error). A second start of a key still loading is a no-op:
concurrent first requests for one adapter load it once. The serial is the registration's: a read
of a name unloaded and registered again is another key, and its stale result is discarded.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from punica.lora.peft import AdapterWeights
from punica.lora.read_buffer import use_scratch

log = logging.getLogger(__name__)

LoadFn = Callable[[], AdapterWeights]


Key = tuple[str, int]
"""(adapter name, registration serial): one read per registration of a name."""


@dataclass(frozen=True)
class LoadResult:
    key: Key
    weights: AdapterWeights | None
    error: Exception | None
    seconds: float
    """How long the load took on its loader thread."""


class AdapterLoader:
    def __init__(self, threads: int = 2, on_done: Callable[[], None] | None = None) -> None:
        """`on_done()` is called on the loader thread after each load (e.g. to wake the engine
        thread, which may be waiting for nothing but loads)."""
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max(1, threads), thread_name_prefix="punica-lora-load", initializer=use_scratch)
        self._lock = threading.Lock()
        self._running: dict[Key, concurrent.futures.Future] = {}
        self._done: list[LoadResult] = []
        self.on_done = on_done

    def loading(self, key: Key) -> bool:
        with self._lock:
            return key in self._running

    @property
    def num_loading(self) -> int:
        with self._lock:
            return len(self._running)

    def start(self, key: Key, load: LoadFn) -> bool:
        """Start reading `key` with load() unless it is being read already; whether it
        started."""
        with self._lock:
            if key in self._running:
                return False
            self._running[key] = self._pool.submit(self._run, key, load)
            return True

    def collect(self) -> list[LoadResult]:
        """The loads finished since the last call (engine thread)."""
        with self._lock:
            done, self._done = self._done, []
        return done

    def _run(self, key: Key, load: LoadFn) -> None:
        start = time.perf_counter()
        weights, error = None, None
        try:
            weights = load()
        except Exception as err:  # noqa: BLE001 - charged to the adapter by the engine
            error = err
        result = LoadResult(key, weights, error, time.perf_counter() - start)
        with self._lock:
            self._running.pop(key, None)
            self._done.append(result)
        if self.on_done is not None:
            try:
                self.on_done()
            except Exception:  # noqa: BLE001 - a wake-up that failed must not lose the load
                log.exception("adapter loader: on_done failed")

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
