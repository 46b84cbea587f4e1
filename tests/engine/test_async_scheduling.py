"""Async scheduling (step k+1 scheduled and launched before step k's tokens reach the host): the
same completions as synchronous steps, in every situation the one-step lag touches: stops by
length and by token, chunked prefill, adapters waiting for slots, preemption, aborts, n > 1
with seeds, logprobs, and penalties (which fall back to synchronous steps)."""

from __future__ import annotations

import pytest
import torch

from punica.config import CacheConfig, EngineConfig, LoraConfig, ModelConfig
from punica.engine.inflight import PLACEHOLDER
from punica.engine.llm_engine import LLMEngine
from punica.engine.sampling_params import SamplingParams
from punica.engine.scheduler import SchedulerConfig
from punica.models.llama import CausalLM
from punica.models.random import random_adapter, random_model, tiny

ARCH = tiny()
MODEL = random_model(ARCH, torch.float32, torch.device("cpu"), seed=3)
BASE = random_adapter("base", ARCH, 4, torch.float32, seed=4)


def engine(async_scheduling: bool, max_num_seqs: int = 4, max_tokens: int = 8,
           num_blocks: int | None = None, max_loras: int = 2, max_model_len: int = 96,
           model: CausalLM = MODEL) -> LLMEngine:
    device = str(model.model.embed_tokens.weight.device)
    e = LLMEngine(EngineConfig(
        model=ModelConfig("<random>", device=device, max_model_len=max_model_len),
        cache=CacheConfig(num_blocks=num_blocks or 64),
        lora=LoraConfig(max_loras=max_loras, max_lora_rank=4),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_tokens,
                                  async_scheduling=async_scheduling)), model=model)
    for i in range(3):
        e.add_lora_weights(random_adapter(f"a{i}", ARCH, 4, torch.float32, seed=10 + i))
    return e


REQUESTS = [  # (prompt, max_tokens, adapter)
    (list(range(1, 6)), 7, "a0"), (list(range(3, 15)), 3, "a1"), ([9], 9, None),
    (list(range(20, 27)), 1, "a2"), (list(range(5, 9)), 5, "a0"), ([2, 4], 6, "a1"),
]


def run(e: LLMEngine, params: dict | None = None, abort_at: dict[int, str] | None = None,
        requests: list[tuple[list[int], int, str | None]] = REQUESTS) -> dict[str, object]:
    for i, (prompt, max_tokens, adapter) in enumerate(requests):
        kw = {"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
              **(params or {})}
        e.add_request(f"r{i}", prompt, SamplingParams(**kw), adapter)
    done: dict[str, object] = {}
    calls = 0
    while e.has_unfinished():
        for out in e.step():
            if out.finished:
                done[out.request_id] = out
            assert all(PLACEHOLDER not in c.token_ids for c in out.outputs)
        calls += 1
        if abort_at and calls in abort_at:
            e.abort(abort_at[calls])
    assert e.scheduler.blocks.num_free == e.scheduler.blocks.num_blocks  # every block back
    assert not e.scheduler.running and not e.scheduler.waiting
    return done


def tokens(done: dict[str, object]) -> dict[str, list[list[int]]]:
    return {rid: [c.token_ids for c in out.outputs] for rid, out in done.items()}


def test_greedy_chunked_prefill_and_slots_match_sync() -> None:
    sync, overlap = run(engine(False)), run(engine(True))
    assert tokens(overlap) == tokens(sync)
    assert [len(t[0]) for t in tokens(sync).values()] != []
    assert all(out.finish_reason == "length" for out in overlap.values())


def test_stop_tokens_mid_run_match_sync() -> None:
    sync = tokens(run(engine(False)))
    stop = sync["r0"][0][3]  # a token r0 produces: r0 (and maybe others) stop on it
    params = {"stop_token_ids": (stop,)}
    a, b = run(engine(False), params), run(engine(True), params)
    assert tokens(b) == tokens(a) and len(tokens(a)["r0"][0]) == 4
    assert {r: o.finish_reason for r, o in b.items()} == {r: o.finish_reason for r, o in a.items()}


def test_preemption_matches_sync() -> None:
    # 3 blocks of 16 tokens for up to 3 sequences of ~25 tokens: preemption by recomputation
    small = {"max_num_seqs": 3, "max_tokens": 16, "num_blocks": 3, "max_model_len": 48}
    long = [(p, 18, a) for p, _, a in REQUESTS[:3]]
    a, b = run(engine(False, **small), requests=long), run(engine(True, **small), requests=long)
    assert tokens(b) == tokens(a) and all(len(t[0]) == 18 for t in tokens(a).values())


def test_aborts_in_flight_match_sync() -> None:
    aborts = {2: "r1", 4: "r2"}  # r1 while its prefill is in flight, r2 mid-decode
    full = tokens(run(engine(False)))
    a, b = run(engine(False), abort_at=aborts), run(engine(True), abort_at=aborts)
    assert "r1" not in b and "r2" not in b
    assert tokens(b) == tokens(a) == {r: t for r, t in full.items() if r not in ("r1", "r2")}


def test_seeded_n_logprobs_and_penalties_match_sync() -> None:
    for params in ({"n": 2, "seed": 5, "temperature": 0.8},
                   {"logprobs": 2},
                   {"presence_penalty": 1.5, "frequency_penalty": 0.5}):
        a = run(engine(False), params, requests=REQUESTS[:3])
        b = run(engine(True), params, requests=REQUESTS[:3])
        assert tokens(b) == tokens(a), params
        if "logprobs" in params:  # the same entries; values up to the batch's rounding
            for rid, out in a.items():
                got = b[rid].outputs[0].logprobs
                want = out.outputs[0].logprobs
                assert [sorted(d) for d in got] == [sorted(d) for d in want]
                assert all(abs(g[t] - w[t]) < 1e-4 for g, w in zip(got, want, strict=True)
                           for t in w)


def test_async_steps_lag_one_call() -> None:
    """The overlap itself: a request's first token comes back one step() call later."""
    outs = {}
    for flag in (False, True):
        e = engine(flag)
        e.add_request("r", [1, 2, 3], SamplingParams(max_tokens=3, temperature=0.0,
                                                     ignore_eos=True))
        outs[flag] = [[o.token_ids for o in e.step()] for _ in range(4)]
    assert outs[False][0] != [] and outs[True][0] == []
    assert outs[True][1:4] == outs[False][0:3]


@pytest.mark.gpu
def test_async_matches_sync_on_the_gpu_with_graphs() -> None:
    """Pinned batch copies, the token gather into graph inputs and the event-timed token copy,
    on CUDA with step graphs."""
    model = random_model(ARCH, torch.float32, torch.device("cuda"), seed=3)
    for params in ({}, {"n": 2, "seed": 5, "temperature": 0.8}):
        a = run(engine(False, model=model), params)
        e = engine(True, model=model)
        b = run(e, params)
        assert tokens(b) == tokens(a), params
        assert e.step_stats.graph_steps > 0


def test_steps_overlap_again_once_penalised_requests_are_gone() -> None:
    e = engine(True)
    plain = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    e.add_request("plain", [1, 2, 3], plain)
    e.add_request("pen", [4, 5], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True,
                                                presence_penalty=1.0))
    e.add_request("pen2", [6], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True,
                                              repetition_penalty=1.2))
    for _ in range(4):
        e.step()
        assert e._inflight is None  # a penalised request: every step settles in its call
    assert "pen2" not in e.unfinished_ids()  # finished by length, forgotten
    e.abort("pen")
    e.step()
    assert e._inflight is not None  # only plain requests left: the step stays in flight
    while e.has_unfinished():
        e.step()
    assert e._penalised == 0
