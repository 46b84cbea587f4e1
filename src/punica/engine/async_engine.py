"""AsyncEngine: the LLMEngine on its own thread, fed by an inbox, streaming to its callers.

Threads: the engine thread alone touches the LLMEngine (requests, aborts, adapter loads and steps
all go through the inbox, so no lock is held across a forward pass). Each request has a sink, a
function the engine thread hands every update (or the request's error) to. For asyncio callers
(`open`, `stream`, `generate`: the server) the sink puts it on an asyncio queue on the caller's
loop with call_soon_threadsafe; the cluster's EngineWorker adds requests with sinks of its own.
Request life cycle: opened (validated, counted in flight, submitted to the inbox) -> added (or
failed: the error goes to its sink) -> updates ... -> finished (last update; forgotten) |
aborted (the reader went away: its `finally` sends an abort, which frees its blocks and adapter
reference). A request whose reader never starts runs to its end (bounded by max_tokens).
A step that raises beyond the LLMEngine's own recovery fails every request (each sink gets the
error) and the loop goes on.

On the engine thread (jobs posted with `submit`, and the `on_iteration` hook): `add_now` adds a
request under the caller's id with its sink, `abort_now` forgets a request's sink and aborts it
in the engine (the one abort path: a stream's reader that leaves and `cancel` use it too).
`on_iteration` is called after each loop iteration that ran jobs or a step, once the step's
updates are delivered.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from punica.engine.llm_engine import LLMEngine
from punica.engine.outputs import RequestOutput
from punica.engine.sampling_params import SamplingParams
from punica.errors import CapacityError

log = logging.getLogger(__name__)

class OverloadedError(CapacityError):
    """Too many requests in flight: try again later (503)."""


Sink = Callable[[RequestOutput | BaseException], None]
"""Takes a request's updates and its error, on the engine thread (it must not block)."""


@dataclass
class _Stream:
    """Where a request's updates go, and what `in_flight` and the observer need of it."""

    put: Sink
    n: int = 1
    """Sequences it runs (SamplingParams.n): its weight in `in_flight`."""
    queue: asyncio.Queue | None = None
    """The queue `put` fills on the caller's loop (requests made with `open`), read by
    `stream`."""
    adapter: str | None = None
    prompt_tokens: int = 0
    start: float = 0.0
    tenant: str = ""


def _queue_sink(loop: asyncio.AbstractEventLoop, q: asyncio.Queue) -> Sink:
    """A sink that puts each item on `q` on `loop` (from the engine thread)."""
    def put(item: RequestOutput | BaseException) -> None:
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:
            pass  # the caller's loop is closed: nobody is reading

    return put


Observer = Callable[[str | None, int, int, "str | None", "float | None", "float | None"], None]


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_in_flight: int = 1024,
                 observer: Observer | None = None,
                 on_iteration: Callable[[], None] | None = None) -> None:
        """observer(adapter, prompt_tokens, generated, finish_reason, ttft_s, tpot_s) is called
        once per request read with `stream` when it ends (finish_reason None: aborted).
        on_iteration() is called on the engine thread after each loop iteration that ran jobs or
        a step, after the step's updates went to their sinks (an error it raises is logged)."""
        self.engine = engine
        self.observer = observer
        self.on_iteration = on_iteration
        self.max_in_flight = max_in_flight
        self._inbox: queue.Queue[Callable[[], None]] = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._stop = threading.Event()
        engine.on_adapter_read = lambda: self.submit(lambda: None)  # wakes the engine thread
        self._thread = threading.Thread(target=self._loop, name="punica-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(lambda: None)
        self._thread.join(timeout=10)
        self.engine.registry.close()

    def healthy(self) -> bool:
        """Whether the engine thread is running (it serves requests)."""
        return self._thread.is_alive()

    @property
    def in_flight(self) -> int:
        """Sequences of the requests opened and not yet finished (a request counts n)."""
        return sum(s.n for s in list(self._streams.values()))

    def in_flight_of(self, tenant: str) -> int:
        """`in_flight` of one tenant's requests (tenant as in `open`)."""
        return sum(s.n for s in list(self._streams.values()) if s.tenant == tenant)

    def submit(self, job: Callable[[], None]) -> None:
        """Run job() on the engine thread, after the jobs submitted before it (any thread).
        An error it raises is logged; the loop goes on."""
        self._inbox.put(job)

    # asyncio callers (the server) ----------------------------------------------------------------
    def open(self, prompt_ids: list[int], params: SamplingParams,
             adapter: str | None, priority: int = 0, tenant: str | None = None) -> str:
        """Validate, reserve a place in flight and submit a request; returns its id.

        Synchronous, so a handler can check everything (and answer 4xx/503) before it starts a
        streamed response. Iterate the request with `stream(rid)`.
        """
        if self.in_flight + params.n > self.max_in_flight:
            raise OverloadedError(f"server overloaded: {self.in_flight} sequences in flight")
        self.engine.validate(prompt_ids, adapter, params)  # read-only, safe from this thread
        rid = f"req-{next(self._ids)}"
        loop, updates = asyncio.get_running_loop(), asyncio.Queue()
        self._streams[rid] = _Stream(_queue_sink(loop, updates), params.n, updates, adapter,
                                     len(prompt_ids), time.perf_counter(),
                                     tenant if tenant is not None else (adapter or ""))
        self.submit(lambda: self._add(rid, prompt_ids, params, adapter, priority, tenant))
        return rid

    def stream(self, rid: str) -> AsyncIterator[RequestOutput]:
        """Updates of an opened request until it finishes; closing the iterator aborts it.

        The request's queue is looked up here, not at the first iteration: a request that
        finishes before its reader starts is forgotten by the engine thread (`_deliver`), but
        its updates are already in the queue taken now.
        """
        return self._iterate(rid, self._streams[rid])

    async def _iterate(self, rid: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
        finished, last, first, failed = False, None, None, False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = failed = True  # the engine forgot it already
                    raise item
                finished, last = item.finished, item
                if first is None and any(c.token_ids for c in item.outputs):
                    first = time.perf_counter()
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self.submit(lambda: self.abort_now(rid))
            self._observe(stream, last, first, "error" if failed else None)

    def cancel(self, rid: str) -> None:
        """Abort an opened request whose stream will never be read."""
        if self._streams.pop(rid, None) is not None:
            self.submit(lambda: self.abort_now(rid))

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       adapter: str | None) -> AsyncIterator[RequestOutput]:
        """open + stream."""
        async for out in self.stream(self.open(prompt_ids, params, adapter)):
            yield out

    def _observe(self, stream: _Stream, last: RequestOutput | None, first: float | None,
                 reason: str | None = None) -> None:
        if self.observer is None:
            return
        generated = sum(len(c.token_ids) for c in last.outputs) if last else 0
        if reason is None:
            reason = last.outputs[0].finish_reason if last and last.finished else None
        ttft = first - stream.start if first is not None else None
        tpot = None
        if first is not None and last is not None and generated > 1:
            tpot = (time.perf_counter() - first) / (generated - 1)
        self.observer(stream.adapter, stream.prompt_tokens, generated, reason, ttft, tpot)

    async def call(self, fn: Callable[[LLMEngine], object]) -> object:
        """Run fn(engine) on the engine thread (adapter loads, listings) and await its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn(self.engine))
            except BaseException as err:  # noqa: BLE001 - handed to the awaiting caller
                future.set_exception(err)

        self.submit(run)
        return await asyncio.wrap_future(future)

    # The engine thread -------------------------------------------------------------------------
    def add_now(self, rid: str, prompt_ids: list[int], params: SamplingParams,
                adapter: str | None, sink: Sink) -> None:
        """Engine thread: add a request under `rid` whose updates (and error) go to `sink`.
        Raises what LLMEngine.add_request raises; the sink is not registered then."""
        self.engine.add_request(rid, prompt_ids, params, adapter)
        self._streams[rid] = _Stream(sink, params.n)

    def abort_now(self, rid: str) -> None:
        """Engine thread: forget the request's sink and abort it in the engine (its blocks and
        adapter reference are freed); nothing more is delivered for it."""
        self._streams.pop(rid, None)
        self.engine.abort(rid)

    def _add(self, rid: str, prompt_ids: list[int], params: SamplingParams,
             adapter: str | None, priority: int = 0, tenant: str | None = None) -> None:
        if rid not in self._streams:
            return  # the caller left before the request was added
        try:
            self.engine.add_request(rid, prompt_ids, params, adapter, priority, tenant)
        except Exception as err:  # noqa: BLE001 - delivered to the request's caller
            # (open() validated it already: a refusal here is unexpected, so it is logged)
            log.warning("the engine refused request %s: %s: %s", rid, type(err).__name__, err)
            self._deliver(rid, err)

    def _deliver(self, rid: str, item: RequestOutput | BaseException) -> None:
        if isinstance(item, RequestOutput) and item.error is not None:
            item = item.error  # a failed request: its reader gets the error
        stream = self._streams.get(rid)
        if stream is None:
            return
        if isinstance(item, BaseException) or item.finished:
            # Done: forget it here too, in case its reader never started (a client that left
            # before the first byte); a reader that did start pops it again, harmlessly.
            self._streams.pop(rid, None)
        try:
            stream.put(item)
        except Exception:  # noqa: BLE001 - one sink's bug must not stop the loop
            log.exception("delivering an update of %s failed", rid)

    def _loop(self) -> None:
        while not self._stop.is_set():
            # Idle, or every queued request waits for its adapter's files: sleep until a job
            # (a loader that finished posts one) or 0.5 s.
            busy = self._run_jobs(block=not self.engine.has_unfinished()
                                  or self.engine.waiting_on_reads())
            if self.engine.has_unfinished():
                self._step()
                busy = True
            if busy and self.on_iteration is not None:
                try:
                    self.on_iteration()
                except Exception:  # noqa: BLE001 - the hook's bug must not stop the loop
                    log.exception("engine on_iteration hook failed")

    def _run_jobs(self, block: bool) -> bool:
        """Run the jobs in the inbox (waiting up to 0.5 s for one if `block`); whether any ran."""
        ran = False
        try:
            while True:
                job = self._inbox.get(block=block and not ran, timeout=0.5)
                ran = True
                try:
                    job()
                except Exception:  # noqa: BLE001 - one job's bug must not stop the loop
                    log.exception("engine inbox job failed")
        except queue.Empty:
            pass
        return ran

    def _step(self) -> None:
        try:
            outputs = self.engine.step()  # charges its own failures to their requests
        except Exception as err:  # noqa: BLE001 - a bug in the recovery itself
            log.critical("engine step failed beyond recovery; failing every request",
                         exc_info=err)
            self._fail_all(err)
            return
        for out in outputs:
            self._deliver(out.request_id, out)

    def _fail_all(self, err: Exception) -> None:
        """The last resort: abort every request in the engine; each sink gets `err`."""
        for rid in self.engine.unfinished_ids():
            self.engine.abort(rid)
            self._deliver(rid, err)
