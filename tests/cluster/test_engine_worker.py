"""The engine actor's body without Ray: an engine out of KV blocks hands back its newest request,
another resumes it from its tokens so far to the output it has unmigrated (penalties, logprobs
and text included), and an abort that overtakes its add drops the add."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from punica.cluster.engine_worker import EngineWorker, Report
from punica.config import CacheConfig, EngineConfig, ModelConfig
from punica.engine.outputs import RequestOutput
from punica.engine.sampling_params import SamplingParams
from punica.errors import AdapterNotFoundError
from punica.server.engine_spec import EngineSpec
from tests.checkpoints import ADAPTERS, save_adapter, save_model

PARAMS = SamplingParams(max_tokens=45, temperature=0.0, ignore_eos=True,
                        frequency_penalty=0.8, repetition_penalty=1.3, logprobs=2)
PROMPTS = {"a@1": list(range(10, 20)), "b@1": list(range(30, 40))}  # 55 tokens: 4 blocks each


@pytest.fixture(scope="module")
def spec(tmp_path_factory: pytest.TempPathFactory) -> EngineSpec:
    base = save_model(tmp_path_factory.mktemp("worker") / "m", "llama")
    return EngineSpec(EngineConfig(ModelConfig(str(base), "float32", "cpu", 64)))


def small(spec: EngineSpec, blocks: int) -> EngineSpec:
    config = spec.config
    return EngineSpec(EngineConfig(config.model, CacheConfig(num_blocks=blocks),
                                   scheduler=config.scheduler))


@pytest.fixture
def workers(spec: EngineSpec) -> Iterator[list[EngineWorker]]:
    # the two workers' threads step at the same time: under the tests' TRITON_INTERPRET=1 their
    # interpreted kernels take turns (ops/launch.py), as the interpreter is not thread-safe
    made = [EngineWorker(0, small(spec, 6)), EngineWorker(1, spec)]
    yield made
    for w in made:
        w.shutdown()


def drain(worker: EngineWorker, until: Callable[[Report], bool], timeout_s: float = 60.0) -> Report:
    """Merge the worker's reports until `until(merged)` holds."""
    merged = worker.poll(0.0)
    deadline = time.time() + timeout_s
    while not until(merged):
        assert time.time() < deadline, f"the worker did not get there in time: {merged}"
        r = worker.poll(0.5)
        merged.state = r.state
        merged.applied += r.applied
        merged.outputs += r.outputs
        merged.failed += r.failed
        merged.migrated += r.migrated
    return merged


def finals(report: Report) -> dict[str, RequestOutput]:
    return {o.request_id: o for o in report.outputs if o.finished}


def test_out_of_blocks_hands_back_the_newest_and_resume_continues_exactly(
        workers: list[EngineWorker]) -> None:
    full, roomy = workers
    for number, (rid, prompt) in enumerate(PROMPTS.items()):
        roomy.add(number, rid, prompt, PARAMS, None)
    want = finals(drain(roomy, lambda r: len(finals(r)) == 2))

    for number, (rid, prompt) in enumerate(PROMPTS.items()):
        full.add(number, rid, prompt, PARAMS, None)
    report = drain(full, lambda r: bool(r.migrated))
    assert report.migrated == ["b@1"] and report.applied == [0, 1]
    last_b = [o for o in report.outputs if o.request_id == "b@1"][-1]
    assert 0 < len(last_b.token_ids) < PARAMS.max_tokens
    assert report.state.running == 1  # b is gone from this engine: its blocks are free

    roomy.add(2, "b@2", PROMPTS["b@1"], PARAMS, None, done=last_b)
    resumed = drain(roomy, lambda r: "b@2" in finals(r))
    first = [o for o in resumed.outputs if o.request_id == "b@2"][0]
    assert len(first.token_ids) == len(last_b.token_ids) + 1  # the next token, nothing else
    got = finals(resumed)["b@2"]
    assert got.token_ids == want["b@1"].token_ids
    assert got.text == want["b@1"].text and got.finish_reason == "length"
    assert len(got.outputs[0].logprobs) == PARAMS.max_tokens
    a = finals(drain(full, lambda r: "a@1" in finals(r)))["a@1"]
    assert a.token_ids == want["a@1"].token_ids


def test_adds_apply_in_placement_order_whatever_order_they_arrive(
        workers: list[EngineWorker]) -> None:
    # Ray runs a threaded actor's calls concurrently: placement 1 may reach the engine first
    _, worker = workers
    worker.add(2, "c@1", [7, 8, 9], SamplingParams(max_tokens=3), None)
    worker.add(1, "b@1", [4, 5, 6], SamplingParams(max_tokens=3), None)
    # `call` queues behind both adds: they reached the engine thread and wait for placement 0
    assert worker.call(lambda e: sorted(e.unfinished_ids())).value == []
    worker.add(0, "a@1", [1, 2, 3], SamplingParams(max_tokens=3), None)
    report = drain(worker, lambda r: len(finals(r)) == 3)
    assert report.applied == [0, 1, 2]
    assert [o.request_id for o in report.outputs if o.finished] == ["a@1", "b@1", "c@1"]


def test_an_abort_that_overtakes_its_add_drops_the_add(workers: list[EngineWorker]) -> None:
    _, worker = workers
    worker.abort("x@1")
    worker.add(0, "x@1", [1, 2, 3], PARAMS, None)
    worker.add(1, "y@1", [1, 2, 3], SamplingParams(max_tokens=2), None)
    report = drain(worker, lambda r: "y@1" in finals(r))
    assert sorted(report.applied) == [0, 1]
    assert {o.request_id for o in report.outputs} == {"y@1"}
    assert worker.call(lambda e: e.has_unfinished()).value is False
    failed = worker.call(lambda e: e.remove_lora("nope"))
    assert failed.value is None and "not loaded" in str(failed.error)


def test_an_abort_of_a_running_request_goes_through_the_async_engine_and_frees_it(
        workers: list[EngineWorker], monkeypatch: pytest.MonkeyPatch) -> None:
    _, worker = workers
    aborted: list[str] = []
    abort_now = worker.async_engine.abort_now
    monkeypatch.setattr(worker.async_engine, "abort_now",
                        lambda rid: (aborted.append(rid), abort_now(rid)))
    worker.add(0, "r@1", [1, 2, 3], SamplingParams(max_tokens=60, ignore_eos=True), None)
    drain(worker, lambda r: any(o.request_id == "r@1" for o in r.outputs))
    assert worker.call(lambda e: e.leftovers()["kv_blocks_used"]).value > 0
    worker.abort("r@1")
    leftovers = worker.call(lambda e: e.leftovers()).value
    assert leftovers == dict.fromkeys(leftovers, 0)  # blocks, slots, detokenizer: all freed
    assert aborted == ["r@1"] and worker.async_engine.in_flight == 0  # its sink is gone too
    rest = worker.poll(0.5)
    assert not rest.failed and not any(o.finished for o in rest.outputs)


def test_a_step_that_raises_beyond_recovery_fails_the_workers_requests_once(
        workers: list[EngineWorker], monkeypatch: pytest.MonkeyPatch) -> None:
    _, worker = workers
    params = SamplingParams(max_tokens=50, ignore_eos=True)
    worker.add(0, "a@1", [1, 2, 3], params, None)
    worker.add(1, "b@1", [4, 5, 6], params, None)
    drain(worker, lambda r: {o.request_id for o in r.outputs} == {"a@1", "b@1"})

    def boom() -> list[RequestOutput]:
        raise ValueError("boom")

    monkeypatch.setattr(worker.engine, "step", boom)
    report = drain(worker, lambda r: len(r.failed) >= 2)
    report.failed += worker.poll(0.5).failed  # nothing more comes
    assert sorted(rid for rid, _ in report.failed) == ["a@1", "b@1"]
    assert all(type(err) is RuntimeError and str(err) == "ValueError: boom"  # portable
               for _, err in report.failed)
    assert not any(o.error is not None or o.finished for o in report.outputs)
    leftovers = worker.call(lambda e: e.leftovers()).value
    assert leftovers == dict.fromkeys(leftovers, 0) and worker.async_engine.in_flight == 0
    monkeypatch.undo()
    worker.add(2, "c@1", [1, 2, 3], SamplingParams(max_tokens=2), None)
    assert finals(drain(worker, lambda r: "c@1" in finals(r)))["c@1"].finish_reason == "length"


def test_a_request_that_fails_reaches_the_frontend_once_as_failed(
        spec: EngineSpec, workers: list[EngineWorker], tmp_path: Path) -> None:
    # unloading an adapter fails its running request in the engine (its RequestOutput carries
    # the error); an add with an adapter that is not loaded fails at once
    _, worker = workers
    adapter = save_adapter(Path(spec.config.model.model), tmp_path / "t", 1, **ADAPTERS["qv8"])
    assert worker.call(lambda e: e.load_lora("t", str(adapter))).error is None
    worker.add(0, "t@1", [1, 2, 3], SamplingParams(max_tokens=50, ignore_eos=True), "t")
    drain(worker, lambda r: any(o.request_id == "t@1" for o in r.outputs))
    assert worker.call(lambda e: e.remove_lora("t")).value == ["t@1"]
    worker.add(1, "lost@1", [1, 2, 3], SamplingParams(max_tokens=2), "t")
    report = drain(worker, lambda r: len(r.failed) >= 2)
    report.failed += worker.poll(0.5).failed  # nothing more comes
    assert sorted(rid for rid, _ in report.failed) == ["lost@1", "t@1"]
    errors = dict(report.failed)
    assert isinstance(errors["t@1"], AdapterNotFoundError)
    assert "unloaded while this request was in flight" in str(errors["t@1"])
    assert "not loaded" in str(errors["lost@1"])
    assert not any(o.error is not None or o.finished for o in report.outputs)  # never twice
    leftovers = worker.call(lambda e: e.leftovers()).value
    assert leftovers == dict.fromkeys(leftovers, 0) and worker.async_engine.in_flight == 0
