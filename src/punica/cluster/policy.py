"""Punica's cluster policy, pure Python: consolidate load on the busiest engines, migrate the
newest request of an engine that runs out of KV memory.

Placement: a new (or migrated) request goes to the engine with the largest running batch that is
still below its max batch and has the free KV blocks the request needs; ties go to the engine
already running more requests of the same adapter (its weights are resident there), then to the
lowest engine id (stable). When no engine has room the request waits in a FCFS queue; the queue's
head is placed first and nothing overtakes it. Busy engines stay full, idle engines stay idle (and
can be released).

Migration: an engine out of KV blocks hands back its newest request; the request keeps its tokens
so far and is placed again at the head of the queue, where it resumes by recomputing prompt +
tokens so far (its stream continues with the next token: no gap, no repeat). A migrated request
goes to another engine when one has room; only when none has does it go back to its source (which
then just recomputes it, as a single engine would).

Request life cycle: queued -> placed on engine e -> (migrated: queued at the head) -> ... ->
finished (the engine reports it; its blocks are free there).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from punica.engine.block_manager import cdiv


@dataclass(frozen=True)
class EngineState:
    """What an engine reports: its load, free KV blocks and running adapters."""

    engine_id: int
    max_batch: int
    running: int
    free_blocks: int
    block_size: int = 16
    adapters: Mapping[str | None, int] = field(default_factory=dict)
    """Running requests per adapter (None: base model)."""
    alive: bool = True

    def has_room(self, blocks: int) -> bool:
        return self.alive and self.running < self.max_batch and self.free_blocks >= blocks


@dataclass(frozen=True)
class ClusterRequest:
    request_id: str
    adapter: str | None
    num_tokens: int
    """Prompt + tokens generated so far: what the engine must (re)compute."""
    arrival: int
    """Arrival order (the newest has the largest)."""
    num_seqs: int = 1
    """Sequences it runs (n completions): what it adds to an engine's batch."""
    source: int | None = None
    """The engine that handed it back (a migrated request), else None."""

    def blocks(self, block_size: int) -> int:
        """KV blocks to hold its tokens and the next one."""
        return cdiv(self.num_tokens + 1, block_size)


def choose_engine(request: ClusterRequest, engines: Iterable[EngineState]) -> int | None:
    """The engine id Punica's policy places `request` on, or None when no engine has room."""
    engines = list(engines)
    if request.source is not None:
        elsewhere = _busiest_with_room(request, [e for e in engines
                                                 if e.engine_id != request.source])
        if elsewhere is not None:
            return elsewhere
    return _busiest_with_room(request, engines)


def _busiest_with_room(request: ClusterRequest, engines: list[EngineState]) -> int | None:
    best_key, best = None, None
    for e in engines:
        if not e.has_room(request.blocks(e.block_size)):
            continue
        key = (e.running, e.adapters.get(request.adapter, 0), -e.engine_id)
        if best_key is None or key > best_key:
            best_key, best = key, e.engine_id
    return best


def migration_victim(requests: Iterable[ClusterRequest]) -> ClusterRequest | None:
    """The request an engine out of KV memory hands back: its newest."""
    return max(requests, key=lambda r: r.arrival, default=None)


class ClusterQueue:
    """FCFS queue of requests waiting for an engine; migrated requests go to its head."""

    def __init__(self) -> None:
        self._queue: deque[ClusterRequest] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def submit(self, request: ClusterRequest) -> None:
        self._queue.append(request)

    def requeue_migrated(self, request: ClusterRequest) -> None:
        self._queue.appendleft(request)

    def discard(self, request_id: str) -> bool:
        """Drop a queued request (its client left); False when it is not queued."""
        for request in self._queue:
            if request.request_id == request_id:
                self._queue.remove(request)
                return True
        return False

    def place(self, engines: list[EngineState]) -> list[tuple[ClusterRequest, int]]:
        """Place queued requests in order while the head fits somewhere; the engines' states
        are updated locally as requests land, so one call places a whole burst correctly."""
        state = {e.engine_id: e for e in engines}
        placed = []
        while self._queue:
            request = self._queue[0]
            engine_id = choose_engine(request, state.values())
            if engine_id is None:
                break
            self._queue.popleft()
            placed.append((request, engine_id))
            e = state[engine_id]
            adapters = dict(e.adapters)
            adapters[request.adapter] = adapters.get(request.adapter, 0) + request.num_seqs
            state[engine_id] = EngineState(e.engine_id, e.max_batch, e.running + request.num_seqs,
                                           e.free_blocks - request.blocks(e.block_size),
                                           e.block_size, adapters, e.alive)
        return placed
