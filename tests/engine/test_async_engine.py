"""AsyncEngine: streaming updates, a bounded number in flight (503), abort on close."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from punica.config import EngineConfig, ModelConfig
from punica.engine.async_engine import AsyncEngine, OverloadedError
from punica.engine.llm_engine import LLMEngine
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
