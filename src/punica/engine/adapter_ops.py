"""The engine's adapters: registering and unloading them, just-in-time folders, and the reads
the loader threads finish (lora/registry.py, lora/loader.py). A mixin of LLMEngine: these methods
run on the engine thread and share its state (the registry, the slots, the scheduler, the
requests); a failure is charged to the adapter's own requests only.

Adapter life cycle: registered (load_lora: parsed now; add_lazy: a just-in-time folder, read at
its first request) -> in host memory (registry cache) <-> read again by a loader thread when a
request needs it and it was evicted -> in a GPU slot while requests use it (lora/slots.py) ->
unloaded (remove_lora: its requests fail with AdapterNotFoundError).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from punica.config import EngineConfig
from punica.engine.scheduler import Scheduler
from punica.engine.sequence import SeqStatus, Sequence
from punica.errors import (
    AdapterInUseError,
    AdapterLoadError,
    AdapterNotFoundError,
    CapacityError,
    PunicaError,
)
from punica.lora.peft import AdapterWeights
from punica.lora.pool import LoraPool
from punica.lora.registry import AdapterRegistry
from punica.lora.slots import AdapterSlots

log = logging.getLogger(__name__)


class AdapterOps:
    config: EngineConfig
    registry: AdapterRegistry
    slots: AdapterSlots
    scheduler: Scheduler
    lora_pool: LoraPool | None
    stats: dict[str, int]
    on_adapter_read: Callable[[], None] | None
    _requests: dict[str, list[Sequence]]
    _errors: dict[str, Exception]
    _inflight: object | None
    _fail_request: Callable[[str, Exception], None]
    """LLMEngine's: finish a request's sequences with finish_reason "error"."""

    def load_lora(self, name: str, path: str, root: str | None = None,
                  replace: bool = False, parsed: AdapterWeights | None = None) -> None:
        """Register (parse and check) the adapter at `path`. `root`: its files must resolve
        below it. An adapter of that name is replaced only with `replace`, and only while no
        request uses it. `parsed`: its weights from `parse_lora` on another thread (the server
        parses off the engine thread); else it is parsed here."""
        if self.lora_pool is None:
            raise CapacityError("LoRA is disabled (max_loras=0)")
        self._check_replace(name, replace)
        self.registry.add(name, path, root, parsed)
        self.slots.drop(name)  # a reload must be copied into the pool again

    def parse_lora(self, name: str, path: str, root: str | None = None) -> AdapterWeights:
        """Parse and check an adapter folder without registering it (any thread)."""
        if self.lora_pool is None:
            raise CapacityError("LoRA is disabled (max_loras=0)")
        return self.registry.parse(name, path, root)

    def add_lora_weights(self, weights: AdapterWeights, replace: bool = False) -> None:
        """Register adapter weights held in memory (no directory behind them)."""
        if self.lora_pool is None:
            raise CapacityError("LoRA is disabled (max_loras=0)")
        self._check_replace(weights.name, replace)
        self.registry.add_weights(weights)
        self.slots.drop(weights.name)

    def _check_replace(self, name: str, replace: bool) -> None:
        if name not in self.registry:
            return
        if not replace:
            raise AdapterInUseError(f"adapter {name!r} is already loaded; unload it first or "
                                    "ask to replace it")
        users = self.requests_of(name)
        if users:
            raise AdapterInUseError(f"adapter {name!r} is used by {len(users)} request(s); "
                                    "replace it when idle")

    def remove_lora(self, name: str) -> list[str]:
        """Unregister an adapter. Its requests, running or queued, fail with
        AdapterNotFoundError (no other request is touched); returns their ids."""
        if name not in self.registry:
            raise AdapterNotFoundError(f"adapter {name!r} is not loaded")
        users = self.requests_of(name)
        err = AdapterNotFoundError(f"adapter {name!r} was unloaded while this request was in "
                                   "flight")
        for rid in users:
            self._fail_request(rid, err)
        self.slots.drop(name)
        self.registry.remove(name)
        return users

    @property
    def jit_root(self) -> str | None:
        """The folder of just-in-time adapters (LoraConfig.lora_root)."""
        return self.config.lora.lora_root

    def list_loras(self) -> list[str]:
        return sorted(self.registry.sources)

    def requests_of(self, adapter: str) -> list[str]:
        """Unfinished requests that use `adapter`."""
        return [rid for rid, seqs in self._requests.items()
                if seqs[0].adapter == adapter and rid not in self._errors]

    def _fail_adapter(self, name: str, err: Exception) -> None:
        """An adapter failed in use: fail its requests, leave its slot empty."""
        err = self._redacted(err)
        log.warning("adapter %r failed; failing its requests: %s", name, err)
        self.stats["adapter_failures"] += 1
        for rid in self.requests_of(name):
            self._fail_request(rid, err)
        self.slots.drop(name)

    def adapter_ready(self, name: str) -> bool:
        """Whether a request of `name` can be admitted now: its weights are in a GPU slot or in
        host memory; if neither, its files are being read (started here when they are not)."""
        return self.slots.is_filled(name) or self.registry.ready(name)

    def _collect_reads(self) -> None:
        """Cache the adapters the loader threads finished reading; a failed read fails the
        queued requests that waited for it (no other request is touched: one running off the
        adapter's GPU slot goes on)."""
        for name, err in self.registry.collect():
            if not isinstance(err, PunicaError):
                err = AdapterLoadError(f"adapter {name!r} could not be read "
                                       f"({type(err).__name__}: {err})")
            err = self._redacted(err)
            log.warning("adapter %r could not be read; failing its queued requests: %s", name,
                        err)
            for rid in self.requests_of(name):
                if not any(s.status is SeqStatus.RUNNING for s in self._requests[rid]):
                    self._fail_request(rid, err)

    def _redacted(self, err: Exception) -> Exception:
        """The error as a client may read it: the just-in-time root's own path (above the
        folders clients name) shown as <lora-root>."""
        if self.jit_root is None:
            return err
        root = str(Path(self.jit_root).resolve())
        text = str(err)
        return type(err)(text.replace(root, "<lora-root>")) if root in text else err

    def waiting_on_reads(self) -> bool:
        """Whether nothing can run until a loader finishes reading an adapter (the caller may
        sleep until `on_adapter_read`). Collects the reads finished so far first."""
        self._collect_reads()
        sched = self.scheduler
        return (not sched.running and self._inflight is None and not self._errors
                and bool(sched.waiting)
                and not any(s.adapter is None or self.adapter_ready(s.adapter)
                            for s in sched.waiting))

    def _adapter_read(self) -> None:
        if self.on_adapter_read is not None:
            self.on_adapter_read()
