"""LLMEngine: the synchronous step loop (schedule -> fill adapter slots -> build batch ->
forward -> sample -> stop checks), holding the model, the KV pool and the adapter pool.

Failures are charged to whom they belong (the requests of other tenants go on untouched):
- an adapter whose slot fill fails (its files changed on disk, a copy raised): every request of
  that adapter fails with the error, its slot is left empty (lora/slots.py), the step runs on
  without them;
- a request whose logits are not finite (an adapter whose numbers overflow in use): that request
  fails (AdapterFailedError);
- unloading an adapter: its requests, running or queued, fail with AdapterNotFoundError;
- an adapter whose files fail to read on a loader thread: the queued requests that waited for it
  fail (AdapterLoadError); registering, unloading and reading adapters live in adapter_ops.py;
- anything else a step raises (a bug, a device error): the requests in that step fail with
  StepFailedError, the traceback is logged, and the engine goes on with the others.
A failed request finishes with finish_reason "error" and its RequestOutput carries the error.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable

import torch

from punica.config import EngineConfig
from punica.engine.adapter_ops import AdapterOps
from punica.engine.block_manager import BlockManager
from punica.engine.inflight import PLACEHOLDER, InFlight, has_placeholder, real_output_ids
from punica.engine.model_runner import ModelRunner
from punica.engine.outputs import CompletionOutput, RequestOutput
from punica.engine.sampler import logprobs_of, sample_tokens
from punica.engine.sampling_params import SamplingParams
from punica.engine.scheduler import Scheduler, SchedulerOutput
from punica.engine.sequence import SeqStatus, Sequence
from punica.engine.step_stats import StepStats
from punica.engine.stops import StopChecker
from punica.errors import (
    AdapterFailedError,
    AdapterLoadError,
    AdapterNotFoundError,
    CapacityError,
    PunicaError,
    StepFailedError,
)
from punica.lora.loader import AdapterLoader
from punica.lora.loader_process import ProcessReader
from punica.lora.pinned_arena import pinned_arena_of
from punica.lora.registry import AdapterRegistry, jit_path
from punica.lora.slots import AdapterSlots
from punica.models.llama import CausalLM
from punica.tokens import load_tokenizer

log = logging.getLogger(__name__)


class LLMEngine(AdapterOps):
    def __init__(self, config: EngineConfig, model: CausalLM | None = None) -> None:
        """`model`: an already built model (benchmarks' random weights); else config.model.model
        is loaded from disk."""
        self.config = config
        mc, cc, lc = config.model, config.cache, config.lora
        self.runner = runner = ModelRunner(config, model)
        """The model, the KV and adapter pools, the step graphs: a step below scheduling."""
        self.arch, self.device, self.dtype = runner.arch, runner.device, runner.dtype
        self.max_model_len = runner.max_model_len
        self.tokenizer = load_tokenizer(mc.model) if model is None else None
        self.lora_pool = runner.lora_pool
        num_blocks = runner.num_blocks
        if num_blocks * cc.block_size < self.max_model_len:
            raise CapacityError(f"the KV cache holds {num_blocks * cc.block_size} tokens, less "
                                f"than max_model_len {self.max_model_len}: give it more memory "
                                "or lower max_model_len")
        a = self.arch
        self.on_adapter_read: Callable[[], None] | None = None
        """Called on a loader thread when an adapter's files were read (AsyncEngine wakes its
        engine thread with it)."""
        loader = (AdapterLoader(max(lc.loader_threads, lc.loader_processes), self._adapter_read)
                  if lc.loader_threads > 0 and lc.max_loras > 0 else None)
        processes = lc.loader_processes if loader is not None else 0
        self.arena = pinned_arena_of(lc.pinned_lora_bytes, lc.max_cpu_lora_bytes, self.device,
                                     shared=processes > 0)
        host_bytes = lc.max_cpu_lora_bytes
        if host_bytes is None and self.arena is not None:
            host_bytes = self.arena.ranges.capacity
        self.registry = AdapterRegistry(a, lc.max_lora_rank,
                                        lc.max_cpu_loras or max(4 * lc.max_loras, 32),
                                        lc.allow_pickle, self.dtype, host_bytes,
                                        loader, pin=self.device.type == "cuda",
                                        arena=self.arena)
        if processes and self.arena is not None:
            self.registry.reader = ProcessReader(processes, self.arena, a, lc.max_lora_rank,
                                                 lc.allow_pickle, self.dtype)
        self.slots = AdapterSlots(max(lc.max_loras, 1))
        self.scheduler = Scheduler(config.scheduler, BlockManager(num_blocks, cc.block_size),
                                   self.slots, self.adapter_ready)
        self.on_adapter_load: Callable[[str, float], None] | None = None
        """Called on the engine thread for each adapter load, by tier: ("disk", seconds a read
        into host memory took) and ("host", seconds the engine thread took to queue a slot
        fill's copies)."""
        self.registry.on_read = lambda seconds: self._adapter_loaded("disk", seconds)
        # Host copies not to evict: those queued requests wait for, and those admitted in
        # the step being scheduled, whose slots are filled from them after the scheduler ran
        # (a read started for a later request in the queue makes room in the same pass).
        self.registry.protected = lambda: self.slots.unfilled() | {
            s.adapter for s in self.scheduler.waiting if s.adapter is not None}
        self.stops = StopChecker(self.tokenizer, a.eos_token_ids, self.max_model_len)
        self.generator = torch.Generator(device=self.device).manual_seed(mc.seed)
        self.stats = {"adapter_loads": 0, "adapter_evictions": 0, "adapter_failures": 0,
                      "step_failures": 0}
        self.step_stats = StepStats()
        self._seq_ids = itertools.count()
        self._requests: dict[str, list[Sequence]] = {}
        self._generators: dict[int, torch.Generator | None] = {}
        self._inflight: InFlight | None = None
        """The step launched by the last call, not settled yet (async scheduling)."""
        self._penalised = 0
        """Sequences added and not yet forgotten whose sampling reads their earlier tokens."""
        self._errors: dict[str, Exception] = {}
        """Unfinished requests that failed (finish_reason "error"), with why."""
        self._step_seqs: list[Sequence] = []
        """The sequences of the step being run (and of the one it settles): a step that raises
        fails these, no others."""

    # Requests ---------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    adapter: str | None = None, priority: int = 0,
                    tenant: str | None = None) -> None:
        """`priority` (lower first) counts under the priority policy; `tenant` (default: the
        adapter, "" for the base model) is whose service the fair policy counts it as."""
        self.validate(prompt_ids, adapter, params)
        if request_id in self._requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        if adapter is not None and adapter not in self.registry:
            path = jit_path(self.jit_root, adapter)
            assert path is not None  # validate() found it
            self.registry.add_lazy(adapter, str(path), self.config.lora.lora_root)
        if adapter is not None:
            self.adapter_ready(adapter)  # prefetch: its files are read while it queues
        seqs = []
        for i in range(params.n):
            seq = Sequence(next(self._seq_ids), request_id, list(prompt_ids), params, adapter,
                           tenant=tenant if tenant is not None else (adapter or ""),
                           priority=priority)
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.device).manual_seed(params.seed + i)
            self._generators[seq.seq_id] = gen
            self.stops.start(seq)
            self._penalised += params.penalised
            seqs.append(seq)
            self.scheduler.add(seq)
        self._requests[request_id] = seqs

    def abort(self, request_id: str) -> None:
        for seq in self._requests.pop(request_id, []):
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
            self._forget(seq)
        self._errors.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def _fail_request(self, request_id: str, err: Exception) -> None:
        """Finish every sequence of a request with finish_reason "error"; its output (at the
        next step) carries `err`."""
        if request_id not in self._requests:
            return
        self._errors.setdefault(request_id, err)
        for seq in self._requests.get(request_id, []):
            if not seq.is_finished:
                self.scheduler.finish(seq, "error")

    def unfinished_ids(self) -> list[str]:
        return list(self._requests)

    def validate(self, prompt_ids: list[int], adapter: str | None,
                 params: SamplingParams | None = None) -> None:
        """The checks add_request makes, without adding (for callers on another thread)."""
        self.stops.validate_prompt(prompt_ids, self.arch.vocab_size, params)
        if adapter is not None and self.lora_pool is None:
            raise AdapterNotFoundError(f"adapter {adapter!r}: LoRA is disabled (max_loras=0)")
        if adapter is not None and adapter not in self.registry and \
                jit_path(self.jit_root, adapter) is None:
            raise AdapterNotFoundError(f"adapter {adapter!r} is not loaded")

    # The step ---------------------------------------------------------------------------
    def step(self, updates: bool = True) -> list[RequestOutput]:
        """Run one step (see _step); an error it raises fails only the requests in it."""
        self._step_seqs = []
        try:
            return self._step(updates)
        except Exception as err:  # noqa: BLE001 - charged to the step's requests, logged
            return self._recover(err)

    def _recover(self, err: Exception) -> list[RequestOutput]:
        """A step raised: fail its requests (those it launched or settled), forget the step in
        flight, and go on with every other request."""
        failed = {s.request_id for s in self._step_seqs} | (
            {s.request_id for s in self._inflight.seqs} if self._inflight else set())
        self._inflight = None
        self.stats["step_failures"] += 1
        log.error("engine step failed; failing the %d request(s) in it", len(failed),
                  exc_info=err)
        wrapped = err if isinstance(err, PunicaError) else StepFailedError(
            f"internal error in this request's engine step ({type(err).__name__}: {err})")
        for rid in failed:
            self._fail_request(rid, wrapped)
        for seqs in self._requests.values():  # a placeholder left by the failed step
            for seq in seqs:
                if has_placeholder(seq):
                    seq.output_ids.pop()
        return self._collect_finished()

    def _step(self, updates: bool = True) -> list[RequestOutput]:
        """Run one step; return the requests that finished in it and, with `updates`, also those
        that got a token (`finished` tells which; finished requests are forgotten by the engine).
        Batch callers pass updates=False: building outputs copies every running request's
        tokens each step.

        With `async_scheduling` the step launched here is settled by the next call (its tokens
        arrive one call later; engine/inflight.py), and the step launched by the previous call
        is settled here, after this one is launched."""
        st = self.step_stats
        t0 = time.perf_counter()
        timed = st.schedule_s + st.forward_s + st.sample_s
        prev, self._inflight = self._inflight, None
        touched: set[str] = set()
        overlap = self.config.scheduler.async_scheduling and not self._needs_history()
        if prev is not None and not overlap:
            touched |= self._settle(prev)
            prev = None
        if prev is not None:
            self._step_seqs = list(prev.seqs)
            self._reserve(prev)
        self._collect_reads()
        out = self.scheduler.schedule()
        stuck = not out.scheduled  # before fills that fail drop their requests from the step
        self._step_seqs += [s.seq for s in out.scheduled]
        self._fill_slots(out)
        if out.scheduled:
            launched = self._launch(out, prev, t0)
            if overlap:
                self._inflight = launched
            else:
                touched |= self._settle(launched)
        elif stuck and prev is None and not touched:
            self._unstick()
        if prev is not None:
            touched |= self._settle(prev)
        finished = self._collect_finished()
        if updates:
            done = {o.request_id for o in finished}
            finished += [self.output_of(rid, self._requests[rid])
                         for rid in sorted(touched - done) if rid in self._requests]
        if out.scheduled:  # the rest of the step: stop checks, finished requests, outputs
            st.steps += 1
            timed = st.schedule_s + st.forward_s + st.sample_s - timed
            st.finish_s += time.perf_counter() - t0 - timed
        return finished

    def warmup(self) -> float:
        """Capture every step graph now (a server's start, a benchmark's untimed part) rather
        than on the first step of each shape; returns the seconds it took (0 without graphs)."""
        return self.runner.warmup()

    def _needs_history(self) -> bool:
        """Whether a request's sampling reads its previous tokens on the host (penalties): a
        count kept by add_request and _forget, not a scan of every sequence each step."""
        return self._penalised > 0

    def _reserve(self, prev: InFlight) -> None:
        """Placeholders for the sequences of the step in flight that go on (not finishing by
        length there), so that the scheduler gives them their next position now."""
        for seq in prev.seqs:
            if seq.status is SeqStatus.RUNNING and not has_placeholder(seq) and \
                    not self.stops.finishes_by_length(seq):
                seq.output_ids.append(PLACEHOLDER)

    def _launch(self, out: SchedulerOutput, prev: InFlight | None, t0: float) -> InFlight:
        """Load adapters, build the batch (rows of placeholders read `prev`'s tokens on the
        device), run the forward pass and sample on the device."""
        st = self.step_stats
        runner = self.runner
        batch = runner.prepare(out.scheduled, self.scheduler.blocks.tables, prev)
        t1 = time.perf_counter()
        st.schedule_s += t1 - t0
        # Eager steps run each shrink after its GEMM: a stream fork and join per projection is
        # host time, and an eager decode step with them was host-bound (21.3 ms against 8.0 ms
        # of GPU work at bs 32, benchmarks/results/step_profile.json).
        key = runner.graph_key_of(batch)
        if key is not None:
            assert runner.graphs is not None
            logits = runner.graphs.run(batch, key=key)
            st.graph_steps += 1
        else:
            logits = runner.execute(batch, use_graphs=False)
            st.eager_steps += 1
        self.scheduler.advance(out)
        t2 = time.perf_counter()
        st.forward_s += t2 - t1
        seqs = [s.seq for s in batch.sampled]
        finite = torch.isfinite(logits.sum(-1))  # a NaN or inf anywhere in the row shows
        tokens, raw = sample_tokens(logits, [s.params for s in seqs],
                                    [s.prompt_ids for s in seqs], [s.output_ids for s in seqs],
                                    [self._generators[s.seq_id] for s in seqs], self.generator)
        launched = InFlight.launch(seqs, tokens, raw, finite)
        st.sample_s += time.perf_counter() - t2
        return launched

    def _fill_slots(self, out: SchedulerOutput) -> None:
        """Copy this step's newly placed adapters into their slots. A fill that fails is
        charged to its adapter (its requests fail, its slot stays empty); the step goes on
        without them."""
        self.stats["adapter_evictions"] += len(out.evicted)
        failed = False
        for slot, name in out.loads:
            try:
                weights = self.registry.get(name)
                start = time.perf_counter()
                self.runner.load_adapter(slot, weights)
                self._adapter_loaded("host", time.perf_counter() - start)
            except Exception as err:  # noqa: BLE001 - charged to the adapter
                if not isinstance(err, PunicaError):
                    log.error("filling slot %d with adapter %r failed", slot, name,
                              exc_info=err)
                    err = AdapterLoadError(f"adapter {name!r} could not be copied into the "
                                           f"adapter pool ({type(err).__name__}: {err})")
                self._fail_adapter(name, err)
                failed = True
                continue
            self.slots.filled(name)
            self.stats["adapter_loads"] += 1
        if failed:
            out.scheduled = [s for s in out.scheduled if not s.seq.is_finished]
        if self.slots.num_unfilled:  # the invariant: no row reads an unfilled slot
            raise RuntimeError(f"{self.slots.num_unfilled} adapter slot(s) left unfilled")

    def _adapter_loaded(self, tier: str, seconds: float) -> None:
        if self.on_adapter_load is not None:
            self.on_adapter_load(tier, seconds)

    def _settle(self, f: InFlight) -> set[str]:
        """Wait for a launched step's tokens; append them (in place of placeholders), run the
        stop checks; returns the requests that got a token."""
        t = time.perf_counter()
        ids, finite = f.wait()
        self.step_stats.sample_s += time.perf_counter() - t
        lps = logprobs_of(f.raw_logprobs, ids, [s.params for s in f.seqs])
        touched = set()
        for seq, token, lp, ok in zip(f.seqs, ids, lps, finite, strict=True):
            if seq.is_finished:  # stopped or aborted while this step was in flight
                continue
            if has_placeholder(seq):
                seq.output_ids.pop()
            if not ok:
                log.warning("request %s failed: its output is not finite (adapter %r)",
                            seq.request_id, seq.adapter)
                self._fail_request(seq.request_id, AdapterFailedError(
                    "the model's output for this request is not finite (NaN or inf); "
                    f"adapter {seq.adapter!r} may overflow in {str(self.dtype)[6:]}"
                    if seq.adapter else "the model's output is not finite (NaN or inf)"))
                touched.add(seq.request_id)
                continue
            reason = self.stops.append(seq, token, lp)
            if reason is not None:
                self.scheduler.finish(seq, reason)
            touched.add(seq.request_id)
        return touched

    def _unstick(self) -> None:
        """Nothing could be scheduled with nothing running: the first request whose adapter is
        in host memory can never run (it needs more than the whole KV pool): fail it rather
        than hang. Requests whose adapter is being read wait for it."""
        if self.scheduler.running:
            return
        seq = next((s for s in self.scheduler.waiting
                    if s.adapter is None or self.adapter_ready(s.adapter)), None)
        if seq is not None:
            log.warning("request %s failed: it needs %d tokens of KV cache, more than the "
                        "engine can give one request", seq.request_id, seq.num_tokens)
            self._fail_request(seq.request_id, CapacityError(
                f"this request needs {seq.num_tokens} tokens of KV cache, more than the engine "
                "can ever give one request"))

    def _collect_finished(self) -> list[RequestOutput]:
        done = []
        for rid, seqs in list(self._requests.items()):
            if all(s.is_finished for s in seqs):
                done.append(self.output_of(rid, seqs))
                for seq in self._requests.pop(rid):
                    self._forget(seq)
                self._errors.pop(rid, None)
        return done

    def _forget(self, seq: Sequence) -> None:
        self._generators.pop(seq.seq_id, None)
        self.stops.forget(seq)
        self._penalised -= seq.params.penalised

    def output_of(self, request_id: str, seqs: list[Sequence]) -> RequestOutput:
        return RequestOutput(request_id, list(seqs[0].prompt_ids), [
            CompletionOutput(i, real_output_ids(s), s.output_text, s.finish_reason,
                             list(s.logprobs) if s.params.logprobs is not None else None)
            for i, s in enumerate(seqs)], finished=all(s.is_finished for s in seqs),
            error=self._errors.get(request_id))

    def leftovers(self) -> dict[str, int]:
        """Per-request state still held (all 0 when nothing is in flight): a leak check."""
        return {"requests": len(self._requests), "errors": len(self._errors),
                "generators": len(self._generators), "detokenizers": self.stops.num_open,
                "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "kv_blocks_used": self.scheduler.blocks.num_blocks -
                self.scheduler.blocks.num_free, "slot_refs": sum(self.slots.pinned().values())}
