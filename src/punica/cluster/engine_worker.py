"""One engine of the cluster: an LLMEngine run by an AsyncEngine, driven by a frontend over Ray.

The class is plain Python (deploy.py wraps it with `ray.remote`, a threaded actor). It has no
thread, inbox or step loop of its own: the AsyncEngine's engine thread runs everything. `add`
and `abort` submit jobs to it (`add_now` / `abort_now`: one abort path), each request's sink
collects its updates and its error into the pending Report, the iteration hook migrates the
requests a step preempted and publishes the Report, `poll` waits for what was published since
the last poll (updates, failures, migrations, the placements it took in and its load), `call`
runs a function on the engine thread. A step that raises beyond the engine's recovery fails
this engine's requests through the AsyncEngine's fail-all (reported as failed).

Migration: when a step preempts requests (the engine ran out of KV blocks), the worker aborts
them here and reports them as migrated; the frontend places each again and the engine that gets
it (`add` with `resume`) replays its tokens so far before the first step, so it recomputes prompt
+ tokens so far and goes on with the next token. Replaying through the stop checker restores the
output text, logprobs and penalty state exactly; only a seeded generator starts afresh.

Calls may run out of submission order (threads). Adds carry consecutive placement numbers per
engine (0, 1, 2, ... from the frontend), and the engine thread applies them in that order,
holding back one that overtook an earlier one: the engine's arrival order, which decides FCFS
admission and which request is the newest when blocks run out, is the frontend's placement
order. An `abort` that overtakes its `add` leaves a tombstone, and the `add` is then dropped.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from punica.cluster.policy import EngineState
from punica.engine.async_engine import AsyncEngine
from punica.engine.llm_engine import LLMEngine
from punica.engine.outputs import RequestOutput
from punica.engine.sampling_params import SamplingParams
from punica.engine.sequence import Sequence
from punica.errors import PunicaError
from punica.server.engine_spec import EngineSpec, build_engine

log = logging.getLogger(__name__)
TOMBSTONES = 4096
"""Aborts remembered for adds that have not arrived yet (the oldest are forgotten)."""


@dataclass(frozen=True)
class EngineInfo:
    """What the frontend needs to know once: limits and the adapters loaded at start."""

    engine_id: int
    vocab_size: int
    max_model_len: int
    block_size: int
    max_batch: int
    num_blocks: int
    adapters: tuple[str, ...]
    device: str
    jit_root: str | None = None
    """The folder of just-in-time adapters (LoraConfig.lora_root)."""


@dataclass
class Report:
    """What happened on an engine since the previous poll, in order, and its load now."""

    state: EngineState
    applied: list[int] = field(default_factory=list)
    """Placement numbers the engine took in (added, failed or dropped)."""
    outputs: list[RequestOutput] = field(default_factory=list)
    failed: list[tuple[str, Exception]] = field(default_factory=list)
    migrated: list[str] = field(default_factory=list)
    """Requests handed back (out of KV blocks): already aborted here."""
    resident: tuple[str, ...] = ()
    """Adapters whose weights are in the engine's GPU slots."""


@dataclass(frozen=True)
class CallResult:
    """A call's value or its error (returned, not raised: Ray would wrap the error)."""

    value: object = None
    error: Exception | None = None


def resume(engine: LLMEngine, request_id: str, done: RequestOutput) -> None:
    """Give a request just added under `request_id` the tokens it had generated elsewhere."""
    seqs = [s for s in engine.scheduler.waiting if s.request_id == request_id]
    for seq, c in zip(seqs, done.outputs, strict=True):
        logprobs = c.logprobs if c.logprobs is not None else [None] * len(c.token_ids)
        reason = None
        for token, lp in zip(c.token_ids, logprobs, strict=True):
            reason = engine.stops.append(seq, token, lp)
        reason = c.finish_reason or reason
        if reason is not None:
            engine.scheduler.finish(seq, reason)


def portable(err: Exception) -> Exception:
    """An error that survives pickling to the frontend with its type when it is Punica's."""
    return err if isinstance(err, PunicaError) else RuntimeError(f"{type(err).__name__}: {err}")


class EngineWorker:
    def __init__(self, engine_id: int, spec: EngineSpec, device_share: float = 1.0) -> None:
        """`device_share`: the fraction of a GPU this engine may use (several share one)."""
        self.engine_id = engine_id
        self.engine = build_engine(_shared_device_spec(spec, device_share))
        self._cond = threading.Condition()
        self._published = Report(self._state())
        self._fresh = False
        self._tombstones: OrderedDict[str, None] = OrderedDict()
        self._next_add = 0  # the placement number applied next (engine thread)
        self._held: dict[int, Callable[[], None]] = {}  # adds that overtook an earlier one
        self._pending = Report(self._published.state)  # built by the engine thread only
        self._running: set[Sequence] = set()  # running after the last iteration (engine thread)
        self.async_engine = AsyncEngine(self.engine, on_iteration=self._on_iteration)

    # The frontend's calls (any thread) ---------------------------------------------------------
    def info(self) -> EngineInfo:
        e = self.engine
        return EngineInfo(self.engine_id, e.arch.vocab_size, e.max_model_len,
                          e.config.cache.block_size, e.config.scheduler.max_num_seqs,
                          e.scheduler.blocks.num_blocks, tuple(e.list_loras()), str(e.device),
                          e.jit_root)

    def add(self, number: int, request_id: str, prompt_ids: list[int], params: SamplingParams,
            adapter: str | None, done: RequestOutput | None = None) -> None:
        """Placement `number` (consecutive per engine, from 0) of a request; applied in number
        order."""
        self.async_engine.submit(lambda: self._in_order(number, lambda: self._add(
            number, request_id, prompt_ids, params, adapter, done)))

    def abort(self, request_id: str) -> None:
        self.async_engine.submit(lambda: self._abort(request_id))

    def poll(self, timeout_s: float) -> Report:
        """Wait up to timeout_s for news; return it (with the current load either way)."""
        with self._cond:
            self._cond.wait_for(lambda: self._fresh, timeout=timeout_s)
            report, self._fresh = self._published, False
            self._published = Report(report.state, resident=report.resident)
        return report

    def call(self, fn: Callable[[LLMEngine], object]) -> CallResult:
        """Run fn(engine) on the engine thread (adapter loads, listings)."""
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(CallResult(fn(self.engine)))
            except Exception as err:  # noqa: BLE001 - handed back to the caller
                future.set_result(CallResult(error=portable(err)))

        self.async_engine.submit(run)
        return future.result()

    def shutdown(self) -> None:
        self.async_engine.shutdown()

    # The engine thread -----------------------------------------------------------------------
    def _in_order(self, number: int, apply: Callable[[], None]) -> None:
        self._held[number] = apply
        while self._next_add in self._held:
            self._held.pop(self._next_add)()
            self._next_add += 1

    def _add(self, number: int, request_id: str, prompt_ids: list[int],
             params: SamplingParams, adapter: str | None, done: RequestOutput | None) -> None:
        self._pending.applied.append(number)
        if request_id in self._tombstones:
            del self._tombstones[request_id]
            return  # aborted before it arrived
        try:
            self.async_engine.add_now(request_id, prompt_ids, params, adapter,
                                      functools.partial(self._sink, request_id))
            if done is not None:
                resume(self.engine, request_id, done)
        except Exception as err:  # noqa: BLE001 - the request's own failure
            if not isinstance(err, PunicaError):
                log.error("engine %d: adding %s failed", self.engine_id, request_id,
                          exc_info=err)
            self.async_engine.abort_now(request_id)
            self._pending.failed.append((request_id, portable(err)))

    def _sink(self, request_id: str, item: RequestOutput | BaseException) -> None:
        """A request's updates go to the pending Report's outputs, its error (a RequestOutput
        with `.error` arrives as that error) to `failed`: the frontend gets it once."""
        if isinstance(item, BaseException):
            self._pending.failed.append((request_id, portable(item)))
        else:
            self._pending.outputs.append(item)

    def _abort(self, request_id: str) -> None:
        if request_id in self.engine.unfinished_ids():
            self.async_engine.abort_now(request_id)
            return
        self._tombstones[request_id] = None
        while len(self._tombstones) > TOMBSTONES:
            self._tombstones.popitem(last=False)

    def _on_iteration(self) -> None:
        """After an iteration that ran jobs or a step: hand back what it preempted, publish."""
        self._migrate()
        self._publish()

    def _migrate(self) -> None:
        """Abort and report as migrated the requests running after the previous iteration and
        waiting now: the step preempted them (out of KV blocks). The jobs in between (adds,
        aborts, calls) do not move a request from running to waiting; only a step does."""
        sched = self.engine.scheduler
        preempted = dict.fromkeys(s.request_id for s in sched.waiting if s in self._running)
        for rid in preempted:
            self.async_engine.abort_now(rid)
            self._pending.migrated.append(rid)
        self._running = set(sched.running)

    def _publish(self) -> None:
        pending = self._pending
        pending.state = self._state()
        pending.resident = tuple(sorted(self.engine.slots.resident()))
        with self._cond:
            old = self._published
            old.state, old.resident = pending.state, pending.resident
            old.applied += pending.applied
            old.outputs += pending.outputs
            old.failed += pending.failed
            old.migrated += pending.migrated
            self._fresh = True
            self._cond.notify_all()
        self._pending = Report(pending.state)

    def _state(self) -> EngineState:
        e = self.engine
        sched, blocks = e.scheduler, e.scheduler.blocks
        seqs = sched.running + list(sched.waiting)
        promised = sum(blocks.blocks_needed(s.seq_id, s.num_tokens + 1) for s in sched.waiting)
        return EngineState(self.engine_id, e.config.scheduler.max_num_seqs, len(seqs),
                           max(0, blocks.num_free - promised), blocks.block_size,
                           dict(Counter(s.adapter for s in seqs)))


def _shared_device_spec(spec: EngineSpec, share: float) -> EngineSpec:
    """On a GPU shared by several engines: budget this engine's memory as `share` x the
    configured utilisation of the whole device (weights included), whatever the others hold."""
    if share >= 1.0:
        return spec
    import dataclasses

    import torch

    if not torch.cuda.is_available() or spec.config.model.device == "cpu":
        return spec
    free, total = torch.cuda.mem_get_info()
    keep_free = free - share * spec.config.cache.gpu_memory_utilization * total
    cache = dataclasses.replace(spec.config.cache,
                                gpu_memory_utilization=max(0.0, 1.0 - keep_free / total))
    return dataclasses.replace(spec, config=dataclasses.replace(spec.config, cache=cache))
