"""Tenant isolation in the engine: a failure is charged to the request or adapter it belongs to.

Every test runs unrelated requests beside the failing tenant and checks they finish with exactly
the tokens they get alone, and that nothing is left behind (blocks, slot pins, per-request
state)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from punica.config import EngineConfig, LoraConfig, ModelConfig
from punica.engine.llm_engine import LLMEngine
from punica.engine.outputs import RequestOutput
from punica.engine.sampling_params import SamplingParams
from punica.errors import (
    AdapterFailedError,
    AdapterLoadError,
    AdapterNotFoundError,
    StepFailedError,
)
from tests.checkpoints import ADAPTERS, save_adapter, save_model

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
UNRELATED = [("u-base", [5, 6, 7, 8], None), ("u-a", [9, 10, 11], "a"),
             ("u-b", [12, 13], "b"), ("u-a2", [14, 15, 16, 17, 18], "a")]
"""Other tenants' requests: (id, prompt, adapter)."""


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("isolation")
    base = save_model(root / "m", "llama")
    adapters = {n: save_adapter(base, root / "loras" / n, i + 1, **ADAPTERS["qv8"])
                for i, n in enumerate(("a", "b", "t"))}
    return base, adapters


def new_engine(base: Path, max_loras: int = 3, max_cpu_loras: int | None = None) -> LLMEngine:
    return LLMEngine(EngineConfig(ModelConfig(str(base), "float32", "cpu", 64),
                                  lora=LoraConfig(max_loras, 16, max_cpu_loras)))


def run(eng: LLMEngine, steps: int = 200) -> dict[str, RequestOutput]:
    """Step until every request finished (at most `steps` steps, not counting the waits for
    adapter files read on loader threads, at most 30 s of them)."""
    done = {}
    deadline = time.monotonic() + 30
    while steps > 0:
        if eng.waiting_on_reads() and time.monotonic() < deadline:
            time.sleep(0.002)
            continue
        steps -= 1
        for out in eng.step(updates=False):
            done[out.request_id] = out
        if not eng.has_unfinished():
            return done
    raise AssertionError(f"requests still unfinished after {steps} steps")


def add_unrelated(eng: LLMEngine) -> None:
    for rid, prompt, adapter in UNRELATED:
        eng.add_request(rid, prompt, GREEDY, adapter)


def alone(base: Path, adapters: dict[str, Path]) -> dict[str, list[int]]:
    """Each unrelated request's tokens when it runs alone on a fresh engine."""
    out = {}
    eng = new_engine(base)
    for name in ("a", "b"):
        eng.load_lora(name, str(adapters[name]))
    for rid, prompt, adapter in UNRELATED:
        eng.add_request(rid, prompt, GREEDY, adapter)
        out[rid] = run(eng)[rid].token_ids
    return out


@pytest.fixture(scope="module")
def expected(family: tuple[Path, dict[str, Path]]) -> dict[str, list[int]]:
    return alone(*family)


def assert_unrelated_exact(done: dict[str, RequestOutput], expected: dict[str, list[int]]) -> None:
    for rid, _, _ in UNRELATED:
        assert done[rid].error is None and done[rid].finish_reason == "length", rid
        assert done[rid].token_ids == expected[rid], rid


def assert_no_leftovers(eng: LLMEngine) -> None:
    assert eng.leftovers() == {k: 0 for k in eng.leftovers()}


def loaded(base: Path, adapters: dict[str, Path], **kw: object) -> LLMEngine:
    eng = new_engine(base, **kw)
    for name in ("a", "b", "t"):
        eng.load_lora(name, str(adapters[name]))
    return eng


def test_unload_fails_only_that_adapters_requests(family, expected) -> None:
    eng = loaded(*family, max_loras=2)  # t's queued requests wait for a slot
    add_unrelated(eng)
    eng.add_request("t-run", [1, 2, 3], GREEDY, "t")
    eng.add_request("t-queued", [3, 2, 1], GREEDY, "t")
    done = {o.request_id: o for o in eng.step(updates=False)}
    assert sorted(eng.remove_lora("t")) == ["t-queued", "t-run"]
    done.update(run(eng))
    for rid in ("t-run", "t-queued"):
        assert done[rid].finish_reason == "error"
        assert isinstance(done[rid].error, AdapterNotFoundError)
    assert_unrelated_exact(done, expected)
    assert_no_leftovers(eng)
    assert "t" not in eng.slots.resident() and "t" not in eng.list_loras()


def test_a_failed_fill_leaves_no_foreign_slot(family, expected, monkeypatch) -> None:
    """A fill that raises part-way fails the adapter's requests and leaves its slot empty: the
    next request for it is filled again and gets its own weights, never the previous
    occupant's."""
    base, adapters = family
    eng = loaded(base, adapters, max_loras=1)
    eng.add_request("first-b", [4, 4, 4], GREEDY, "b")  # b occupies the only slot
    run(eng)
    real_load = eng.lora_pool.load
    calls = []

    def half_load(slot: int, weights: object) -> None:
        calls.append(weights.name)
        if len(calls) == 1:
            layer0 = {k: v for k, v in weights.modules.items() if k[0] == 0}
            real_load(slot, type(weights)(weights.name, weights.path, layer0))  # partial copy
            raise OSError("simulated failure part-way through a fill")
        real_load(slot, weights)

    monkeypatch.setattr(eng.lora_pool, "load", half_load)
    eng.add_request("t1", [1, 2, 3], GREEDY, "t")
    t1 = run(eng)["t1"]
    assert t1.finish_reason == "error" and isinstance(t1.error, AdapterLoadError)
    assert eng.slots.resident() == {} and eng.stats["adapter_failures"] == 1
    eng.add_request("t2", [1, 2, 3], GREEDY, "t")
    t2 = run(eng)["t2"]
    monkeypatch.undo()
    ref = new_engine(base)
    ref.load_lora("t", str(adapters["t"]))
    ref.add_request("t2", [1, 2, 3], GREEDY, "t")
    assert t2.error is None and t2.token_ids == run(ref)["t2"].token_ids
    add_unrelated(eng)
    assert_unrelated_exact(run(eng), expected)
    assert_no_leftovers(eng)


def test_a_failed_fill_does_not_fail_the_request_waiting_behind_it(family, expected,
                                                                   monkeypatch) -> None:
    """One slot: t's request takes it, b's waits; t's fill fails. The step then runs nothing,
    and b's request must not be taken for one that can never run: it runs next."""
    base, adapters = family
    eng = loaded(base, adapters, max_loras=1)

    def refuse_t(slot: int, weights: object) -> None:
        if weights.name == "t":
            raise OSError("simulated fill failure")
        real_load(slot, weights)

    real_load = eng.lora_pool.load
    monkeypatch.setattr(eng.lora_pool, "load", refuse_t)
    eng.add_request("t1", [1, 2, 3], GREEDY, "t")
    eng.add_request("u-b", UNRELATED[2][1], GREEDY, "b")
    done = run(eng)
    assert isinstance(done["t1"].error, AdapterLoadError)
    assert done["u-b"].error is None and done["u-b"].token_ids == expected["u-b"]
    assert_no_leftovers(eng)


def test_files_changed_on_disk_are_refused_not_mixed(family, expected, tmp_path) -> None:
    base, adapters = family
    copy = Path(shutil.copytree(adapters["t"], tmp_path / "t"))
    eng = loaded(base, adapters, max_loras=2, max_cpu_loras=1)
    eng.load_lora("t", str(copy), replace=True)
    eng.add_request("warm-a", [1, 2], GREEDY, "a")  # pushes t out of the host cache
    run(eng)
    st = copy / "adapter_model.safetensors"
    tensors = load_file(str(st))
    save_file({k: v * 2 for k, v in tensors.items()}, str(st))
    os.utime(st, ns=(1, 1))
    add_unrelated(eng)
    eng.add_request("t-changed", [1, 2, 3], GREEDY, "t")
    done = run(eng)
    assert done["t-changed"].finish_reason == "error"
    assert isinstance(done["t-changed"].error, AdapterLoadError)
    assert "changed on disk" in str(done["t-changed"].error)
    assert_unrelated_exact(done, expected)
    assert_no_leftovers(eng)
    eng.load_lora("t", str(copy), replace=True)  # taking the new files is explicit
    eng.add_request("t-new", [1, 2, 3], GREEDY, "t")
    assert run(eng)["t-new"].error is None


def test_an_adapter_overflowing_in_use_fails_only_its_requests(family, expected,
                                                                tmp_path) -> None:
    """Finite weights and scale pass the load checks; their product overflows float32 in the
    forward pass. The request's logits are not finite: it fails, nobody else does."""
    base, adapters = family
    bomb = Path(shutil.copytree(adapters["t"], tmp_path / "bomb"))
    st = bomb / "adapter_model.safetensors"
    save_file({k: torch.full_like(v, 1e30) for k, v in load_file(str(st)).items()}, str(st))
    eng = loaded(base, adapters)
    eng.load_lora("bomb", str(bomb))
    add_unrelated(eng)
    eng.add_request("boom", [1, 2, 3], GREEDY, "bomb")
    done = run(eng)
    assert done["boom"].finish_reason == "error"
    assert isinstance(done["boom"].error, AdapterFailedError)
    assert_unrelated_exact(done, expected)
    assert_no_leftovers(eng)


def test_a_step_that_raises_fails_only_its_requests(family, expected, monkeypatch,
                                                    caplog) -> None:
    base, adapters = family
    eng = loaded(base, adapters)
    real_forward = eng.runner.model.forward
    fired = []

    def forward_once_broken(ctx: object) -> torch.Tensor:
        if not fired:
            fired.append(True)
            raise IndexError("simulated bug in a forward pass")
        return real_forward(ctx)

    monkeypatch.setattr(eng.runner.model, "forward", forward_once_broken)
    eng.add_request("victim", [1, 2, 3], GREEDY, "t")
    done = {o.request_id: o for o in eng.step(updates=False)}
    assert isinstance(done["victim"].error, StepFailedError)
    assert "IndexError" in str(done["victim"].error) and eng.stats["step_failures"] == 1
    logged = [r for r in caplog.records if "engine step failed" in r.getMessage()]
    assert logged and logged[0].exc_info[0] is IndexError  # with its traceback
    add_unrelated(eng)
    assert_unrelated_exact(run(eng), expected)
    assert_no_leftovers(eng)


def test_thousands_of_aborts_leave_nothing_behind(family, expected) -> None:
    """2,000 requests added and most aborted while unrelated ones run: those finish as alone,
    and no per-request state is left."""
    base, adapters = family
    eng = loaded(base, adapters, max_loras=2)
    add_unrelated(eng)
    params = SamplingParams(max_tokens=20, n=2, logprobs=2, seed=3, presence_penalty=0.5)
    names = [None, "a", "b", "t"]
    done = {}
    for i in range(2000):
        eng.add_request(f"r{i}", [1 + i % 50, 2, 3], params, names[i % 4])
        if i % 7 == 0:
            done.update({o.request_id: o for o in eng.step(updates=False)})
        if i % 3 != 2:  # a third run on (some finish, some are aborted below)
            eng.abort(f"r{i}")
    for rid in [r for r in eng.unfinished_ids() if r.startswith("r")]:
        eng.abort(rid)
    done.update(run(eng, steps=400))
    assert_unrelated_exact(done, expected)
    assert_no_leftovers(eng)
