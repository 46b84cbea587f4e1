"""ClusterEngine: the frontend of a Punica cluster, with AsyncEngine's interface (open, stream,
cancel, generate, call, in_flight), so the OpenAI server in punica.server.app serves it unchanged.

Threads: callers (the server's event loop, tests' loops) open and read requests; one dispatcher
thread runs its own event loop and alone owns the cluster state: the FCFS queue, each request's
placement and each engine's load. Every engine has a pump on that loop, a long poll of its actor
(one Report per engine step, or a heartbeat); after each report the queue is placed again.

Engine life cycle: alive -> dead (its poll failed: its requests are placed again) -> restarted
(with a start function: a new actor after a backoff that doubles with each death of that engine,
1 s to 30 s; it is given the cluster's adapters as they are now, its placement numbers and load
start afresh, and a new pump reads it) -> alive.

Request life cycle: opened (validated, counted in flight) -> queued -> placed on engine e (sent
with a placement number and the tag `rid@attempt`) -> updates streamed back -> finished | failed |
aborted (the reader left: the engine is told) | migrated (engine e ran out of KV blocks) or
recovered (engine e died): queued at the head again with its tokens so far, placed again
(preferably elsewhere) and resumed there by recomputation, so the stream goes on with the next
token. Updates carry the whole state of a request, so a stream never repeats or skips a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import ray
from ray.exceptions import ActorUnavailableError, RayTaskError

from punica.cluster.cluster_model import ClusterModel
from punica.cluster.engine_load import EngineLoad
from punica.cluster.engine_worker import CallResult, EngineInfo
from punica.cluster.policy import ClusterQueue, ClusterRequest, EngineState
from punica.engine.async_engine import OverloadedError
from punica.engine.llm_engine import LLMEngine
from punica.engine.outputs import RequestOutput
from punica.engine.sampling_params import SamplingParams
from punica.errors import EngineUnavailableError, InvalidRequestError

log = logging.getLogger(__name__)
RESTART_FIRST_S, RESTART_MAX_S = 1.0, 30.0
"""Backoff before an engine is started again: the first, doubled per death, at most."""
POLL_S = 1.0
"""Longest wait of one poll: an idle engine reports its load this often."""
PLACEMENT_LOG = 4096
STALL_LOG = 1024


@dataclass(frozen=True)
class Placement:
    request_id: str
    engine_id: int
    why: str
    """new | migrated (its engine ran out of KV blocks) | recovered (its engine died)"""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    n: int = 1
    """Sequences it runs: its weight in `in_flight`."""


@dataclass(eq=False)
class _Request:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None
    arrival: int
    engine: int | None = None
    attempt: int = 0
    why: str = "new"
    last: RequestOutput | None = None
    """The latest update: the tokens so far, replayed where the request resumes."""
    last_at: float | None = None
    """When the latest update arrived (monotonic seconds)."""
    resuming: bool = False
    """Migrated and not yet heard from again: its next update ends a stall."""

    @property
    def tag(self) -> str:
        return f"{self.rid}@{self.attempt}"

    def queued(self, source: int | None = None) -> ClusterRequest:
        generated = sum(len(c.token_ids) for c in self.last.outputs) if self.last else 0
        tokens = len(self.prompt_ids) * self.params.n + generated
        return ClusterRequest(self.rid, self.adapter, tokens, self.arrival, self.params.n, source)


@dataclass
class _Counters:
    migrations: int = 0
    recoveries: int = 0
    restarts: int = 0
    deaths: Counter[int] = field(default_factory=Counter)
    placed: Counter[int] = field(default_factory=Counter)
    """Placements per engine id since start (first placements, migrations and recoveries)."""
    placements: deque[Placement] = field(default_factory=lambda: deque(maxlen=PLACEMENT_LOG))
    stalls: deque[float] = field(default_factory=lambda: deque(maxlen=STALL_LOG))
    """Latency a migration added to its request: seconds between the last update before the
    migration and the first one after (queueing, placement and recomputation)."""


class ClusterEngine:
    def __init__(self, actors: list, infos: list[EngineInfo], tokenizer: object | None,
                 max_in_flight: int = 1024,
                 start_engine: Callable[[int], object] | None = None) -> None:
        """`actors`: EngineWorker actor handles, `infos` their EngineInfo in the same order.
        `start_engine(engine_id)`: a new actor for a dead engine (None: dead stays dead)."""
        self.engine = ClusterModel(self, infos[0], tokenizer)
        self._start_engine = start_engine
        self.max_in_flight = max_in_flight
        self.actors = actors
        self.infos = infos
        self.stats = _Counters()
        self._loads = [EngineLoad(EngineState(i.engine_id, i.max_batch, 0, i.num_blocks,
                                              i.block_size)) for i in infos]
        self._streams: dict[str, _Stream] = {}
        self._requests: dict[str, _Request] = {}
        self._users: Counter[str | None] = Counter()
        self._queue = ClusterQueue()
        self._ids, self._arrivals = itertools.count(), itertools.count()
        # placement numbers, consecutive per engine: the engine applies its adds in this order
        self._numbers = [itertools.count() for _ in actors]
        self._closing = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="punica-cluster",
                                        daemon=True)
        self._thread.start()
        self._pumps: list[asyncio.Task] = []
        for eid in range(len(actors)):
            self._post(lambda e=eid: self._pumps.append(self._loop.create_task(self._pump(e))))

    # AsyncEngine's interface (callers' threads) -------------------------------------------------
    @property
    def in_flight(self) -> int:
        """Sequences of the requests opened and not yet finished (a request counts n)."""
        return sum(s.n for s in list(self._streams.values()))

    def healthy(self) -> bool:
        """Whether some engine is alive (a request can be served)."""
        return any(load.alive for load in self._loads)

    def open(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None,
             priority: int = 0, tenant: str | None = None) -> str:
        """`priority` must be 0 and `tenant` is not used: the cluster's engines schedule FCFS
        (the server refuses other priorities first)."""
        if priority != 0:
            raise InvalidRequestError("priority: the cluster schedules first come, first served")
        if not self.healthy():
            raise EngineUnavailableError("no engine of the cluster is alive")
        if self.in_flight + params.n > self.max_in_flight:
            raise OverloadedError(f"server overloaded: {self.in_flight} sequences in flight")
        self.engine.validate(prompt_ids, adapter, params)
        rid = f"req-{next(self._ids)}"
        self._streams[rid] = _Stream(asyncio.get_running_loop(), asyncio.Queue(), params.n)
        self._post(self._submit, rid, list(prompt_ids), params, adapter)
        return rid

    def stream(self, rid: str) -> AsyncIterator[RequestOutput]:
        """Updates of an opened request until it finishes; closing the iterator aborts it.
        Call it right after `open` (it binds the request's queue at once, so a request that
        finishes before its reader starts is still read in full)."""
        return self._read(rid, self._streams[rid])

    async def _read(self, rid: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self._post(self._abort, rid)

    def cancel(self, rid: str) -> None:
        if self._streams.pop(rid, None) is not None:
            self._post(self._abort, rid)

    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       adapter: str | None) -> AsyncIterator[RequestOutput]:
        async for out in self.stream(self.open(prompt_ids, params, adapter)):
            yield out

    async def call(self, fn: Callable[[ClusterModel], object]) -> object:
        """fn(the cluster as one engine): adapter loads and listings reach every engine."""
        return await asyncio.to_thread(fn, self.engine)

    async def status(self, base_name: str = "base") -> dict:
        """Each engine's load and which are idle, the queue, migrations and recoveries."""
        future = asyncio.run_coroutine_threadsafe(self._status(base_name), self._loop)
        return await asyncio.wrap_future(future)

    def shutdown(self) -> None:
        """Stop the dispatcher and the engine actors."""
        self._closing = True

        async def stop_pumps() -> None:
            for task in self._pumps:
                task.cancel()
            await asyncio.gather(*self._pumps, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop_pumps(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        for actor in self.actors:
            ray.kill(actor)

    # For ClusterModel (a worker thread) ---------------------------------------------------------
    def fan_out(self, fn: Callable[[LLMEngine], object]) -> list[CallResult]:
        """fn(engine) on every live engine; engines that die meanwhile are left out."""
        refs = [a.call.remote(fn) for a, load in zip(self.actors, self._loads, strict=True)
                if load.alive]
        results = []
        for ref in refs:
            try:
                results.append(ray.get(ref))
            except ray.exceptions.RayActorError:
                continue  # its pump finds out and places its requests again
        return results

    def adapter_users(self, name: str) -> int:
        return self._users.get(name, 0)

    # The dispatcher thread ------------------------------------------------------------------
    def _post(self, fn: Callable[..., None], *args: object) -> None:
        self._loop.call_soon_threadsafe(fn, *args)

    def _submit(self, rid: str, prompt_ids: list[int], params: SamplingParams,
                adapter: str | None) -> None:
        if rid not in self._streams:
            return  # its caller left already
        request = _Request(rid, prompt_ids, params, adapter, next(self._arrivals))
        self._requests[rid] = request
        self._users[adapter] += 1
        self._queue.submit(request.queued())
        self._place()

    def _place(self) -> None:
        if not len(self._queue):
            return
        live = [load for load in self._loads if load.alive]
        if not live:
            self._fail_all(EngineUnavailableError("no engine of the cluster is alive"))
            return
        for queued, eid in self._queue.place([load.estimate() for load in live]):
            request = self._requests[queued.request_id]
            request.engine, request.attempt = eid, request.attempt + 1
            number = next(self._numbers[eid])
            self._loads[eid].sent(number, queued)
            self.actors[eid].add.remote(number, request.tag, request.prompt_ids,
                                        request.params, request.adapter, request.last)
            self.stats.placements.append(Placement(request.rid, eid, request.why))
            self.stats.placed[eid] += 1

    async def _pump(self, eid: int) -> None:
        actor = self.actors[eid]
        while not self._closing:
            try:
                report = await actor.poll.remote(POLL_S)
            except ActorUnavailableError:
                await asyncio.sleep(POLL_S)  # unreachable for now: ask again
                continue
            except RayTaskError as err:  # its poll raised (a bug there): logged, not a death
                log.error("engine %d: poll failed", eid, exc_info=err)
                await asyncio.sleep(POLL_S)
                continue
            except Exception as err:  # noqa: BLE001 - dead: its requests go elsewhere
                log.error("engine %d died (%s); placing its requests again", eid,
                          type(err).__name__)
                self._engine_died(eid)
                return
            try:
                self._absorb(eid, report)
                self._place()
            except Exception:  # noqa: BLE001 - a bug here must not stop this engine's pump
                log.exception("engine %d: handling its report failed", eid)

    def _absorb(self, eid: int, report: object) -> None:
        self._loads[eid].absorb(report.state, report.applied, report.resident)
        for out in report.outputs:
            request = self._current(eid, out.request_id)
            if request is not None:
                out.request_id = request.rid
                now = time.monotonic()
                if request.resuming and request.last_at is not None:
                    self.stats.stalls.append(now - request.last_at)
                request.last, request.last_at, request.resuming = out, now, False
                self._deliver(request.rid, out)
                if out.finished:
                    self._forget(request)
        for tag, err in report.failed:
            request = self._current(eid, tag)
            if request is not None:
                self._deliver(request.rid, err)
                self._forget(request)
        for tag in report.migrated:
            request = self._current(eid, tag)
            if request is not None:
                self.stats.migrations += 1
                request.resuming = True
                self._requeue(request, "migrated", source=eid)

    def _current(self, eid: int, tag: str) -> _Request | None:
        """The request an engine's message is about, unless it has moved on since."""
        rid, _, _ = tag.rpartition("@")
        request = self._requests.get(rid)
        if request is None or request.engine != eid or request.tag != tag:
            return None
        return request

    def _requeue(self, request: _Request, why: str, source: int | None = None) -> None:
        request.engine, request.why = None, why
        self._queue.requeue_migrated(request.queued(source))

    def _engine_died(self, eid: int) -> None:
        self._loads[eid].alive = False
        try:
            ray.kill(self.actors[eid])  # a live actor whose reports cannot be read: stop it
        except Exception:  # noqa: BLE001 - already gone
            pass
        stranded = [r for r in self._requests.values() if r.engine == eid]
        for request in sorted(stranded, key=lambda r: r.arrival, reverse=True):
            self.stats.recoveries += 1
            self._requeue(request, "recovered")  # the oldest ends up at the head
        self.stats.deaths[eid] += 1
        if self._start_engine is not None and not self._closing:
            self._pumps.append(self._loop.create_task(self._restart(eid)))
        self._place()

    async def _restart(self, eid: int) -> None:
        """Start engine `eid` again (after the backoff), give it the cluster's adapters, and
        read it with a new pump; a start that fails is tried again, backing off further."""
        delay = min(RESTART_MAX_S, RESTART_FIRST_S * 2 ** (self.stats.deaths[eid] - 1))
        while not self._closing:
            await asyncio.sleep(delay)
            actor = None
            try:
                actor = self._start_engine(eid)
                info = await actor.info.remote()
                await asyncio.to_thread(self.engine.sync_adapters, actor)
                break
            except Exception as err:  # noqa: BLE001 - logged; tried again later
                log.error("engine %d: restart failed (%s: %s); next try in %.0f s", eid,
                          type(err).__name__, err, min(RESTART_MAX_S, 2 * delay))
                if actor is not None:
                    with contextlib.suppress(Exception):
                        ray.kill(actor)
                delay = min(RESTART_MAX_S, 2 * delay)
        else:
            return
        self.actors[eid], self.infos[eid] = actor, info
        self._numbers[eid] = itertools.count()
        self._loads[eid] = EngineLoad(EngineState(eid, info.max_batch, 0, info.num_blocks,
                                                  info.block_size))
        self.stats.restarts += 1
        log.info("engine %d restarted", eid)
        self._pumps.append(self._loop.create_task(self._pump(eid)))
        try:  # adapters loaded or unloaded while it started reached only the live engines
            await asyncio.to_thread(self.engine.sync_adapters, actor)
        except Exception as err:  # noqa: BLE001 - its pump finds out if it died
            log.warning("engine %d: adapters not synced after its restart (%s)", eid, err)
        await asyncio.to_thread(self.engine.refresh)
        self._place()

    def _abort(self, rid: str) -> None:
        request = self._requests.get(rid)
        if request is None:
            return
        if request.engine is None:
            self._queue.discard(rid)
        else:
            self.actors[request.engine].abort.remote(request.tag)
        self._forget(request)

    def _forget(self, request: _Request) -> None:
        del self._requests[request.rid]
        self._users[request.adapter] -= 1
        if not self._users[request.adapter]:
            del self._users[request.adapter]

    def _fail_all(self, err: Exception) -> None:
        for request in list(self._requests.values()):
            self._queue.discard(request.rid)
            self._deliver(request.rid, err)
            self._forget(request)

    def _deliver(self, rid: str, item: RequestOutput | Exception) -> None:
        if isinstance(item, RequestOutput) and item.error is not None:
            item = item.error  # the request failed on its engine: its reader gets the error
        stream = self._streams.get(rid)
        if stream is None:
            return
        if isinstance(item, BaseException) or item.finished:
            self._streams.pop(rid, None)  # done: forget it even if its reader never starts
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:
            pass  # the caller's loop is closed: nobody is reading

    async def _status(self, base_name: str) -> dict:
        engines = [{**load.describe(base_name), "num_blocks": info.num_blocks}
                   for load, info in zip(self._loads, self.infos, strict=True)]
        return {"engines": engines,
                "idle_engines": [e["engine_id"] for e in engines if e["idle"]],
                "queued": len(self._queue), "in_flight": len(self._requests),
                "migrations": self.stats.migrations, "recoveries": self.stats.recoveries,
                "restarts": self.stats.restarts,
                "migration_stalls_s": list(self.stats.stalls),
                "placements_per_engine": {str(e): self.stats.placed[e]
                                          for e in range(len(self._loads))}}
