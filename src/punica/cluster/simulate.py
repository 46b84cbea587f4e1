"""Cluster simulator: a trace replayed over simulated GPUs under a placement policy.

Each GPU runs continuous batching: every step decodes one token for each running request and
prefills (prompt + tokens so far) of the requests placed since the previous step; the step time
comes from a StepModel. A GPU that lacks KV room for a step migrates its newest request (queued
at the head, recomputed wherever it lands next). Steps cost O(1): a request's finishing step is
known when it starts, so nothing walks the batch per step.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field

from punica.bench.workloads import request_lengths
from punica.cluster.policy import ClusterRequest, EngineState, choose_engine
from punica.cluster.step_model import StepModel


@dataclass(frozen=True)
class SimConfig:
    gpus: int = 16
    duration_s: float = 3600.0
    peak_rate: float = 32.0
    """Requests/s at the middle of the trace; the rate ramps up from 0 and back down."""
    max_batch: int = 32
    kv_tokens: int = 100_000
    num_adapters: int = 100
    zipf: float = 1.5
    maxlen: int = 2048
    block_size: int = 16
    seed: int = 0
    sample_every_s: float = 10.0


@dataclass(eq=False)
class SimRequest:
    rid: int
    adapter: int
    prompt: int
    output: int
    arrival: float
    generated: int = 0
    gpu: int = -1
    start_step: int = 0
    finish_step: int = 0
    first_token: float | None = None
    finish: float | None = None
    migrations: int = 0
    migrated_at: float | None = None
    """When it was last handed back (its latest token's time), until it resumes."""
    epoch: int = 0
    """Placements so far: tells a finishing entry of an earlier placement from the current one."""

    @property
    def tokens(self) -> int:
        return self.prompt + self.generated


@dataclass(eq=False)
class SimGpu:
    gid: int
    running: dict[int, SimRequest] = field(default_factory=dict)
    pending: list[SimRequest] = field(default_factory=list)
    finishing: list[tuple[int, int, int]] = field(default_factory=list)
    adapters: dict[int, int] = field(default_factory=dict)
    step: int = 0
    kv: int = 0
    busy: bool = False
    in_step: list[SimRequest] = field(default_factory=list)


def trace_of(rows: list[dict]) -> list[SimRequest]:
    """A recorded run's requests (bench serve's per_request rows: arrival, adapter, prompt and
    tokens), in arrival order, to replay the same trace."""
    rows = sorted(rows, key=lambda r: r["arrival"])
    return [SimRequest(i, int(r["adapter"]), int(r["prompt"]), max(int(r["tokens"]), 1),
                       float(r["arrival"])) for i, r in enumerate(rows)]


def make_trace(cfg: SimConfig) -> list[SimRequest]:
    """Poisson arrivals (thinned) with rate peak * sin(pi t / T); Zipf adapter popularity."""
    rng = random.Random(cfg.seed)
    times, t = [], 0.0
    while True:
        t += rng.expovariate(cfg.peak_rate)
        if t >= cfg.duration_s:
            break
        if rng.random() < math.sin(math.pi * t / cfg.duration_s):
            times.append(t)
    lengths = request_lengths(len(times), cfg.maxlen, cfg.seed + 1)
    weights = [1.0 / (k + 1) ** cfg.zipf for k in range(cfg.num_adapters)]
    adapters = rng.choices(range(cfg.num_adapters), weights=weights, k=len(times))
    return [SimRequest(i, a, p, o, at) for i, (at, (p, o), a) in
            enumerate(zip(times, lengths, adapters, strict=True))]


class Simulator:
    def __init__(self, cfg: SimConfig, model: StepModel, policy: str) -> None:
        if policy not in ("punica", "round-robin", "least-loaded"):
            raise ValueError(f"policy: expected punica, round-robin or least-loaded, got {policy}")
        self.cfg, self.model, self.policy = cfg, model, policy
        self.gpus = [SimGpu(g) for g in range(cfg.gpus)]
        self.queue: deque[SimRequest] = deque()
        self.events: list[tuple[float, int]] = []
        self.samples: list[tuple[float, list[int]]] = []
        self.migrations = 0
        self.stalls: list[float] = []
        """Latency each migration added: its request's last token to its next one."""
        self._rr = 0

    # Policy ---------------------------------------------------------------------------------
    def _room(self, g: SimGpu, r: SimRequest) -> bool:
        blocks = -(-(r.tokens + 1) // self.cfg.block_size)
        free = (self.cfg.kv_tokens - g.kv) // self.cfg.block_size
        return len(g.running) < self.cfg.max_batch and free >= blocks

    def _choose(self, r: SimRequest) -> SimGpu | None:
        if self.policy == "punica":
            states = [EngineState(g.gid, self.cfg.max_batch, len(g.running),
                                  (self.cfg.kv_tokens - g.kv) // self.cfg.block_size,
                                  self.cfg.block_size, {str(a): n for a, n in g.adapters.items()})
                      for g in self.gpus]
            gid = choose_engine(ClusterRequest(str(r.rid), str(r.adapter), r.tokens, r.rid),
                                states)
            return None if gid is None else self.gpus[gid]
        fits = [g for g in self.gpus if self._room(g, r)]
        if not fits:
            return None
        if self.policy == "least-loaded":
            return min(fits, key=lambda g: (len(g.running), g.gid))
        n = len(self.gpus)
        for k in range(n):
            g = self.gpus[(self._rr + k) % n]
            if g in fits:
                self._rr = (g.gid + 1) % n
                return g
        return None

    def _place(self, t: float) -> None:
        while self.queue:
            g = self._choose(self.queue[0])
            if g is None:
                return
            r = self.queue.popleft()
            r.gpu = g.gid
            r.epoch += 1
            g.running[r.rid] = r
            g.pending.append(r)
            g.kv += r.tokens
            g.adapters[r.adapter] = g.adapters.get(r.adapter, 0) + 1
            if not g.busy:
                self._start_step(g, t)

    # Steps ----------------------------------------------------------------------------------
    def _start_step(self, g: SimGpu, t: float) -> None:
        while g.running and g.kv + len(g.running) > self.cfg.kv_tokens:
            self._migrate(g, t)
        if not g.running:
            g.busy = False
            return
        prefill = 0
        for r in g.pending:
            prefill += r.tokens
            r.start_step = g.step
            r.finish_step = g.step + (r.output - r.generated) - 1
            heapq.heappush(g.finishing, (r.finish_step, r.rid, r.epoch))
        g.in_step, g.pending = g.pending, []
        batch = len(g.running)
        dt = self.model.step_s(batch - len(g.in_step), prefill, g.kv)
        g.busy = True
        heapq.heappush(self.events, (t + dt, g.gid))

    def _end_step(self, g: SimGpu, t: float) -> None:
        g.kv += len(g.running) - len(g.pending)  # every request in the step got a token
        for r in g.in_step:
            if r.first_token is None:
                r.first_token = t
            if r.migrated_at is not None:
                self.stalls.append(t - r.migrated_at)
                r.migrated_at = None
        g.in_step = []
        while g.finishing and g.finishing[0][0] <= g.step:
            _, rid, epoch = heapq.heappop(g.finishing)
            r = g.running.get(rid)
            if r is None or r.epoch != epoch:
                continue  # migrated away (maybe back again, under a later epoch)
            r.generated = r.output
            r.finish = t
            self._remove(g, r)
        g.step += 1

    def _remove(self, g: SimGpu, r: SimRequest) -> None:
        del g.running[r.rid]
        g.kv -= r.tokens
        g.adapters[r.adapter] -= 1
        if not g.adapters[r.adapter]:
            del g.adapters[r.adapter]

    def _migrate(self, g: SimGpu, t: float) -> None:
        r = max(g.running.values(), key=lambda x: x.arrival)
        if r in g.pending:
            g.pending.remove(r)
        else:
            r.generated += g.step - r.start_step
            if r.generated and r.migrated_at is None:
                r.migrated_at = t
        self._remove(g, r)
        r.migrations += 1
        self.migrations += 1
        self.queue.appendleft(r)

    # The loop -------------------------------------------------------------------------------
    def run(self, trace: list[SimRequest]) -> list[SimRequest]:
        arrivals = deque(trace)
        next_sample = 0.0
        while arrivals or self.events:
            t_arr = arrivals[0].arrival if arrivals else math.inf
            t_step = self.events[0][0] if self.events else math.inf
            t = min(t_arr, t_step)
            while next_sample <= t:
                self.samples.append((next_sample, [len(g.running) for g in self.gpus]))
                next_sample += self.cfg.sample_every_s
            if t_arr <= t_step:
                self.queue.append(arrivals.popleft())
                self._place(t)
            else:
                _, gid = heapq.heappop(self.events)
                g = self.gpus[gid]
                self._end_step(g, t)
                self._place(t)
                self._start_step(g, t)
        return trace
