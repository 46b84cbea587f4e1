"""Thousands of evictions across both adapter tiers (host memory and GPU slots) leave every
adapter's output equal to HF transformers + PEFT for that adapter, and an unrelated stream of
base-model requests beside them equal to its output alone.

Six just-in-time adapters of different ranks and targets (nested names included) are served from
a lora_root through the offline API with one or two GPU slots and host memory for about one
adapter, and requested in turn so that nearly every request reads its adapter from disk again and
copies it into a slot again: once with reads on the step thread and one host entry (every count
exact), once on loader threads with the host cache bounded in bytes. About 25 s on a 2-core CPU.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from punica import LLM, SamplingParams
from punica.lora.registry import weights_bytes
from tests.checkpoints import ADAPTERS, save_adapter, save_model
from tests.models.test_generation_vs_hf import hf_generate

KINDS = {  # name below the root -> PEFT LoraConfig arguments (ranks 1-16, every projection)
    "qv8": ADAPTERS["qv8"],
    "org/all4rs": ADAPTERS["all4rs"],
    "org/team/mlp16": dict(ADAPTERS["mlp16"], lora_alpha=48),  # alpha 4: the base's tokens
    "o2": dict(r=2, lora_alpha=4, target_modules=["o_proj", "down_proj"]),
    "ku12": dict(r=12, lora_alpha=6, target_modules=["k_proj", "up_proj"]),
    "qv1": dict(r=1, lora_alpha=3, target_modules=["q_proj", "v_proj"]),
}
NAMES = list(KINDS)
PROMPTS = [[17, 250, 3], [5, 99, 142, 7, 301], [44, 2, 380, 61, 9, 120, 33, 8]]
MAX_NEW = 3
"""Tokens of every oracle generation; a request asks for 2 or 3 of them."""
ROUNDS = 540
"""Generate calls of two adapter requests each: 1,080 adapter requests, nearly all evicting in
both tiers (2,000 evictions and more)."""


@dataclass(frozen=True)
class Fleet:
    base: Path
    root: Path
    oracle: dict[tuple[str | None, int], list[int]]
    """HF + PEFT greedy tokens by (adapter, prompt index); adapter None: the base model."""


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: the ~6,000 tiny steps gain nothing from two, and on a busy 2-core
    machine OpenMP's waits for a descheduled thread made them 10-20x slower at times (a probe
    of 240 requests: 1.3-2.3 s with one thread; 2 s, or 19-46 s beside another test run, with
    two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    tmp = tmp_path_factory.mktemp("churn")
    base = save_model(tmp / "m", "llama")
    root = tmp / "loras"
    paths = {name: save_adapter(base, root / name, i + 1, **kw)
             for i, (name, kw) in enumerate(KINDS.items())}
    keys = [None, *NAMES]
    requests = [(p, k, MAX_NEW) for k in keys for p in PROMPTS]
    # PEFT adapter names may not hold "/": it gets its own
    peft_names = {name: f"a{i}" for i, name in enumerate(NAMES)}
    expected = hf_generate(base, {peft_names[n]: p for n, p in paths.items()},
                           [(p, k and peft_names[k], m) for p, k, m in requests])
    oracle = {(k, i): out for (k, i), out in
              zip(itertools.product(keys, range(len(PROMPTS))), expected, strict=True)}
    by_key = {k: tuple(tuple(oracle[k, i]) for i in range(len(PROMPTS))) for k in keys}
    assert len(set(by_key.values())) == len(keys), "two adapters (or the base) answer alike"
    return Fleet(base, root, oracle)


def llm(fleet: Fleet, max_loras: int, threads: int, max_cpu_loras: int | None = None,
        max_cpu_lora_bytes: int | None = None, processes: int = 0) -> LLM:
    return LLM(str(fleet.base), dtype="float32", device="cpu", max_model_len=32,
               max_loras=max_loras, max_lora_rank=16, max_cpu_loras=max_cpu_loras,
               max_cpu_lora_bytes=max_cpu_lora_bytes, lora_loader_threads=threads,
               lora_root=str(fleet.root), block_size=16, num_kv_blocks=16,
               lora_loader_processes=processes,
               pinned_lora_bytes=(16 << 20) if processes else None)


@pytest.fixture(scope="module")
def base_alone(fleet: Fleet) -> dict[int, list[int]]:
    """Each base-model prompt's tokens from a fresh engine, one request at a time."""
    alone = llm(fleet, max_loras=1, threads=0)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    out = {i: alone.generate([p], params, use_tqdm=False)[0].token_ids
           for i, p in enumerate(PROMPTS)}
    assert out == {i: fleet.oracle[None, i] for i in range(len(PROMPTS))}
    return out


def churn(engine: LLM, base_alone: dict[int, list[int]], oracle: dict,
          rounds: int = ROUNDS) -> int:
    """`rounds` generate calls of [adapter, base, next adapter] (the six adapters in turn, 2 or 3
    tokens each; the base request beside them); asserts every output. Returns how many adapter
    requests were served."""
    turn = itertools.cycle(NAMES)
    served = 0
    for r in range(rounds):
        adapters = [next(turn), None, next(turn)]
        prompts = [(r + j) % len(PROMPTS) for j in range(3)]
        lengths = [2 + (r + j) % 2 for j in range(3)]
        outs = engine.generate([PROMPTS[i] for i in prompts],
                               [SamplingParams(max_tokens=m, temperature=0.0) for m in lengths],
                               lora=adapters, use_tqdm=False)
        for out, a, i, m in zip(outs, adapters, prompts, lengths, strict=True):
            want = (oracle[a, i] if a is not None else base_alone[i])[:m]
            assert out.token_ids == want, (r, a, i)
            assert out.error is None
        served += 2
    return served


def test_step_thread_reads_every_request_evicts_in_both_tiers(
        fleet: Fleet, base_alone: dict[int, list[int]]) -> None:
    """One slot, one host entry, reads on the step thread: every adapter request reads its
    folder again and evicts the previous adapter from host memory and from the slot."""
    engine = llm(fleet, max_loras=1, threads=0, max_cpu_loras=1)
    served = churn(engine, base_alone, fleet.oracle)
    reg, stats = engine.engine.registry.stats, engine.engine.stats
    assert served == 2 * ROUNDS
    assert reg["disk_loads"] == served and reg["host_evictions"] == served - 1
    assert stats["adapter_loads"] == served and stats["adapter_evictions"] == served - 1
    assert reg["host_evictions"] + stats["adapter_evictions"] == 4 * ROUNDS - 2 >= 2000
    assert reg["load_failures"] == 0 and stats["adapter_failures"] == 0
    assert engine.engine.registry.cached() == [NAMES[(served - 1) % len(NAMES)]]


def test_loader_threads_and_a_byte_bound_evict_in_both_tiers(
        fleet: Fleet, base_alone: dict[int, list[int]]) -> None:
    """Two slots, host memory bounded by the largest adapter's bytes, reads on two loader
    threads (prefetched while requests queue): the six adapters in turn still miss both tiers
    nearly every time."""
    probe = llm(fleet, max_loras=1, threads=0)
    largest = max(weights_bytes(probe.engine.registry.parse(n, str(fleet.root / n)))
                  for n in NAMES)
    engine = llm(fleet, max_loras=2, threads=2, max_cpu_lora_bytes=largest)
    served = churn(engine, base_alone, fleet.oracle)
    registry, stats = engine.engine.registry, engine.engine.stats
    reg = registry.stats
    assert reg["disk_loads"] == served and stats["adapter_evictions"] == served - 2
    assert reg["host_evictions"] == served - len(registry.cached())  # all read, all dropped
    assert reg["host_evictions"] + stats["adapter_evictions"] >= 2000, (dict(reg), stats)
    assert reg["load_failures"] == 0 and stats["adapter_failures"] == 0
    assert registry.cached_bytes <= largest


def test_loader_processes_serve_every_adapter_as_hf_peft(
        fleet: Fleet, base_alone: dict[int, list[int]]) -> None:
    """Reads in a loader process, into a shared arena: two slots, host memory bounded by the
    largest adapter's bytes, the six adapters in turn, so that every request is read again in
    the process."""
    probe = llm(fleet, max_loras=1, threads=0)
    largest = max(weights_bytes(probe.engine.registry.parse(n, str(fleet.root / n)))
                  for n in NAMES)
    engine = llm(fleet, max_loras=2, threads=1, processes=1, max_cpu_lora_bytes=largest)
    registry = engine.engine.registry
    try:
        served = churn(engine, base_alone, fleet.oracle, rounds=60)
        assert registry.reader is not None and engine.engine.arena is not None
        assert engine.engine.arena.shared and engine.engine.arena.fallbacks == 0
        assert registry.stats["disk_loads"] == served and registry.stats["load_failures"] == 0
        assert all(w.blocks is not None and w.blocks.offsets
                   for w in (registry.get(n) for n in registry.cached()))
    finally:
        registry.close()


def test_a_loader_process_that_dies_fails_only_its_adapters_requests(
        fleet: Fleet, base_alone: dict[int, list[int]]) -> None:
    """The loader process is killed while idle: the next adapter read fails (its request gets
    the reason), base-model requests beside it finish exactly as alone, and a new process serves
    the next read of the same adapter."""
    import os
    import signal

    engine = llm(fleet, max_loras=2, threads=1, processes=1)
    registry = engine.engine.registry
    try:
        greedy = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
        first = engine.generate([PROMPTS[0]], greedy, lora="qv8", use_tqdm=False)[0]
        assert first.token_ids == fleet.oracle["qv8", 0]  # the process is up and serving
        (worker,) = registry.reader._all
        os.kill(worker.process.pid, signal.SIGKILL)
        worker.process.join(10)
        outs = engine.generate(PROMPTS, greedy, lora=[None, "org/all4rs", None],
                               use_tqdm=False)
        assert outs[1].error is not None and "loader process" in str(outs[1].error)
        assert [outs[0].token_ids, outs[2].token_ids] == [base_alone[0], base_alone[2]]
        again = engine.generate([PROMPTS[1]], greedy, lora="org/all4rs", use_tqdm=False)[0]
        assert again.error is None and again.token_ids == fleet.oracle["org/all4rs", 1]
    finally:
        registry.close()
