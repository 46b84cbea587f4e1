"""AsyncEngine: streaming updates, a bounded number in flight (503), abort on close, requests
with sinks of their own on the engine thread, the iteration hook and the last-resort fail-all."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from punica.config import EngineConfig, ModelConfig
from punica.engine.async_engine import AsyncEngine, OverloadedError
from punica.engine.llm_engine import LLMEngine
from punica.engine.outputs import RequestOutput
from punica.engine.sampling_params import SamplingParams
from tests.checkpoints import save_model


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> LLMEngine:
    base = save_model(tmp_path_factory.mktemp("async") / "m", "llama")
    return LLMEngine(EngineConfig(ModelConfig(str(base), "float32", "cpu", 64)))


def test_stream_overload_and_abort(engine: LLMEngine) -> None:
    observed = []
    ae = AsyncEngine(engine, max_in_flight=2, observer=lambda *a: observed.append(a))

    async def main() -> None:
        params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
        a = ae.open([1, 2, 3], params, None)
        b = ae.open([4, 5], params, None)
        with pytest.raises(OverloadedError, match="overloaded"):
            ae.open([6], params, None)
        stream = ae.stream(a)
        first = await stream.__anext__()
        assert len(first.token_ids) >= 1 and not first.finished
        await stream.aclose()  # the reader leaves: request a is aborted
        outs = [o async for o in ae.stream(b)]
        assert outs[-1].finished and len(outs[-1].token_ids) == 40
        assert [len(o.token_ids) for o in outs] == sorted(len(o.token_ids) for o in outs)

    try:
        asyncio.run(main())
        for _ in range(100):
            if not engine.has_unfinished():
                break
            asyncio.run(asyncio.sleep(0.05))
        assert not engine.has_unfinished() and ae.in_flight == 0
        blocks = engine.scheduler.blocks
        assert blocks.num_free == blocks.num_blocks
        assert sorted(o[3] or "abort" for o in observed) == ["abort", "length"]
    finally:
        ae.shutdown()


def test_bad_prompt_fails_before_submission(engine: LLMEngine, tmp_path: Path) -> None:
    ae = AsyncEngine(engine)
    try:
        async def main() -> None:
            with pytest.raises(ValueError, match="empty prompt"):
                ae.open([], SamplingParams(), None)

        asyncio.run(main())
        assert ae.in_flight == 0
    finally:
        ae.shutdown()


def test_request_finished_before_its_reader_starts(engine: LLMEngine) -> None:
    ae = AsyncEngine(engine)

    async def main() -> None:
        params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        stream = ae.stream(ae.open([1, 2, 3], params, None))
        for _ in range(200):  # the engine thread finishes it and forgets it
            if ae.in_flight == 0:
                break
            await asyncio.sleep(0.02)
        assert ae.in_flight == 0
        outs = [o async for o in stream]
        assert outs[-1].finished and len(outs[-1].token_ids) == 2

    try:
        asyncio.run(main())
    finally:
        ae.shutdown()


def test_sinks_the_iteration_hook_and_the_last_resort(engine: LLMEngine,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests added on the engine thread with a sink, and opened ones, share the loop: a step
    that raises beyond recovery fails both once each, and the loop goes on."""
    iterations: list[bool] = []
    ae = AsyncEngine(engine, on_iteration=lambda: iterations.append(engine.has_unfinished()))
    got: list[RequestOutput | BaseException] = []
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)

    def boom() -> list[RequestOutput]:
        raise RuntimeError("boom")

    async def main() -> None:
        ae.submit(lambda: ae.add_now("mine", [1, 2, 3], params, None, got.append))
        stream = ae.stream(ae.open([4, 5], params, None))
        assert not (await stream.__anext__()).finished
        for _ in range(200):
            if got:
                break
            await asyncio.sleep(0.02)
        assert got and ae.in_flight == 2
        monkeypatch.setattr(engine, "step", boom)
        with pytest.raises(RuntimeError, match="boom"):
            async for _ in stream:
                pass

    try:
        asyncio.run(main())
        _wait(lambda: not engine.has_unfinished())
        errors = [x for x in got if isinstance(x, BaseException)]
        assert len(errors) == 1 and got[-1] is errors[0] and str(errors[0]) == "boom"
        assert all(not o.finished for o in got[:-1])
        assert ae.in_flight == 0 and set(engine.leftovers().values()) == {0}
        assert iterations and iterations[0] is True
        monkeypatch.undo()
        done: list[RequestOutput | BaseException] = []
        short = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        ae.submit(lambda: ae.add_now("next", [1, 2], short, None, done.append))
        _wait(lambda: bool(done) and done[-1].finished)
        assert ae.healthy() and len(done[-1].token_ids) == 3
    finally:
        ae.shutdown()


def test_abort_now_forgets_the_sink_and_frees_the_request(engine: LLMEngine) -> None:
    ae = AsyncEngine(engine)
    got: list[RequestOutput | BaseException] = []
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    try:
        ae.submit(lambda: ae.add_now("r", [1, 2, 3], params, None, got.append))
        _wait(lambda: bool(got))
        ae.submit(lambda: ae.abort_now("r"))
        _wait(lambda: not engine.has_unfinished())
        seen = len(got)
        time.sleep(0.2)  # a few more loop turns: nothing more is delivered
        assert len(got) == seen and not got[-1].finished
        assert ae.in_flight == 0 and set(engine.leftovers().values()) == {0}
        with pytest.raises(ValueError, match="empty prompt"):  # add_now raises; no sink left
            asyncio.run(ae.call(lambda e: ae.add_now("bad", [], params, None, got.append)))
        assert ae.in_flight == 0
    finally:
        ae.shutdown()


def _wait(cond: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.time() + timeout_s
    while not cond():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)
