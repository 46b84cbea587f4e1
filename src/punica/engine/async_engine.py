"""AsyncEngine: the LLMEngine on its own thread, fed by an inbox, streaming to asyncio callers.

Threads: the engine thread alone touches the LLMEngine (requests, aborts, adapter loads and steps
all go through the inbox, so no lock is held across a forward pass). Each request has an asyncio
queue on its caller's loop; the engine thread puts every update there with call_soon_threadsafe.
Request life cycle: opened (validated, counted in flight, submitted to the inbox) -> added (or
failed: the error is put on its queue) -> updates ... -> finished (last update; forgotten) |
aborted (the reader went away: its `finally` sends an abort, which frees its blocks and adapter
reference). A request whose reader never starts runs to its end (bounded by max_tokens).
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


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    adapter: str | None
    prompt_tokens: int
    start: float
    n: int = 1
    """Sequences it runs (SamplingParams.n): its weight in `in_flight`."""


Observer = Callable[[str | None, int, int, "str | None", "float | None", "float | None"], None]


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_in_flight: int = 1024,
                 observer: Observer | None = None) -> None:
        """observer(adapter, prompt_tokens, generated, finish_reason, ttft_s, tpot_s) is called
        once per request when it ends (finish_reason None: aborted)."""
        self.engine = engine
        self.observer = observer
        self.max_in_flight = max_in_flight
        self._inbox: queue.Queue[Callable[[], None]] = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="punica-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop.set()
        self._inbox.put(lambda: None)
        self._thread.join(timeout=10)

    def healthy(self) -> bool:
        """Whether the engine thread is running (it serves requests)."""
        return self._thread.is_alive()

    @property
    def in_flight(self) -> int:
        """Sequences of the requests opened and not yet finished (a request counts n)."""
        return sum(s.n for s in list(self._streams.values()))

    def open(self, prompt_ids: list[int], params: SamplingParams,
             adapter: str | None) -> str:
        """Validate, reserve a place in flight and submit a request; returns its id.

        Synchronous, so a handler can check everything (and answer 4xx/503) before it starts a
        streamed response. Iterate the request with `stream(rid)`.
        """
        if self.in_flight + params.n > self.max_in_flight:
            raise OverloadedError(f"server overloaded: {self.in_flight} sequences in flight")
        self.engine.validate(prompt_ids, adapter, params)  # read-only, safe from this thread
        rid = f"req-{next(self._ids)}"
        self._streams[rid] = _Stream(asyncio.get_running_loop(), asyncio.Queue(), adapter,
                                     len(prompt_ids), time.perf_counter(), params.n)
        self._inbox.put(lambda: self._add(rid, prompt_ids, params, adapter))
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
                self._inbox.put(lambda: self.engine.abort(rid))
            self._observe(stream, last, first, "error" if failed else None)

    def cancel(self, rid: str) -> None:
        """Abort an opened request whose stream will never be read."""
        if self._streams.pop(rid, None) is not None:
            self._inbox.put(lambda: self.engine.abort(rid))

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

        self._inbox.put(run)
        return await asyncio.wrap_future(future)

    def _add(self, rid: str, prompt_ids: list[int], params: SamplingParams,
             adapter: str | None) -> None:
        if rid not in self._streams:
            return  # the caller left before the request was added
        try:
            self.engine.add_request(rid, prompt_ids, params, adapter)
        except Exception as err:  # noqa: BLE001 - delivered to the request's caller
            self._deliver(rid, err)

    def _deliver(self, rid: str, item: object) -> None:
        if isinstance(item, RequestOutput) and item.error is not None:
            item = item.error  # a failed request: its reader gets the error
        stream = self._streams.get(rid)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
            if isinstance(item, BaseException) or item.finished:
                # Done: forget it here too, in case its reader never started (a client that
                # left before the first byte); a reader that did start pops it again, harmlessly.
                self._streams.pop(rid, None)

    def _loop(self) -> None:
        while not self._stop.is_set():
            block = not self.engine.has_unfinished()
            try:
                while True:
                    job = self._inbox.get(block=block, timeout=0.5 if block else None)
                    block = False
                    try:
                        job()
                    except Exception:  # noqa: BLE001 - one job's bug must not stop the loop
                        log.exception("engine inbox job failed")
            except queue.Empty:
                pass
            if self.engine.has_unfinished():
                try:
                    outputs = self.engine.step()  # charges its own failures to their requests
                except Exception as err:  # noqa: BLE001 - a bug in the recovery itself
                    log.critical("engine step failed beyond recovery; failing every request",
                                 exc_info=err)
                    self._fail_all(err)
                    continue
                for out in outputs:
                    self._deliver(out.request_id, out)

    def _fail_all(self, err: Exception) -> None:
        for rid in self.engine.unfinished_ids():
            self.engine.abort(rid)
            self._deliver(rid, err)
