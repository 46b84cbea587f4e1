"""Punica on a local Ray cluster of CPU engines over a tiny checkpoint: placements follow the
policy, a migrated request and the requests of a killed engine finish with the greedy output
they have without migration, and their streams neither skip nor repeat a token."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from punica.cluster.deploy import ClusterConfig, start_cluster  # noqa: E402
from punica.cluster.frontend import ClusterEngine  # noqa: E402
from punica.config import CacheConfig, EngineConfig, ModelConfig  # noqa: E402
from punica.engine.llm_engine import LLMEngine  # noqa: E402
from punica.engine.outputs import RequestOutput  # noqa: E402
from punica.engine.sampling_params import SamplingParams  # noqa: E402
from punica.engine.scheduler import SchedulerConfig  # noqa: E402
from punica.errors import EngineUnavailableError  # noqa: E402
from punica.server.engine_spec import EngineSpec  # noqa: E402
from tests.checkpoints import ADAPTERS, save_adapter, save_model  # noqa: E402

MAX_BATCH = 2
NUM_BLOCKS = 6  # 96 tokens of 16: two 55-token requests cannot share one engine to the end


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tmp_path_factory.mktemp("cluster") / "tiny-llama", "llama")


@pytest.fixture(scope="module")
def spec(model_dir: Path) -> EngineSpec:
    return EngineSpec(EngineConfig(ModelConfig(str(model_dir), "float32", "cpu", 64),
                                   CacheConfig(num_blocks=NUM_BLOCKS),
                                   scheduler=SchedulerConfig(max_num_seqs=MAX_BATCH)))


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    # The engines run the torch reference ops, not Triton's interpreter (which tests set).
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             object_store_memory=100 << 20, runtime_env={"env_vars": {"TRITON_INTERPRET": "0"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def cluster(local_ray: None, spec: EngineSpec) -> Iterator[ClusterEngine]:
    engine = start_cluster(spec, ClusterConfig(num_engines=2, cpus_per_engine=1))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> LLMEngine:
    """The same model in this process, one engine with room for everything: no migration."""
    return LLMEngine(EngineConfig(ModelConfig(str(model_dir), "float32", "cpu", 64)))


def offline(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    for i, p in enumerate(prompts):
        engine.add_request(f"ref-{i}", p, params)
    done: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step(updates=False):
            done[out.request_id] = out.token_ids
    return [done[f"ref-{i}"] for i in range(len(prompts))]


async def read(cluster: ClusterEngine, rid: str) -> list[RequestOutput]:
    return [out async for out in cluster.stream(rid)]


def assert_continuous(updates: list[RequestOutput]) -> None:
    """Each update extends the previous one: no token or character lost or repeated."""
    for before, after in zip(updates, updates[1:], strict=False):
        assert len(after.token_ids) > len(before.token_ids)
        assert after.token_ids[:len(before.token_ids)] == before.token_ids
        assert after.text.startswith(before.text)
    assert updates[-1].finished and updates[-1].finish_reason == "length"


def wait_idle(cluster: ClusterEngine, engines: int) -> dict:
    deadline = time.time() + 30
    while True:
        status = asyncio.run(cluster.status())
        if len(status["idle_engines"]) == engines or time.time() > deadline:
            return status
        time.sleep(0.1)


def test_placements_consolidate_then_queue_fcfs(cluster: ClusterEngine) -> None:
    async def main() -> tuple[list[str], list[list[RequestOutput]], dict]:
        rids = [cluster.open([5 + i, 6, 7], greedy(12), None) for i in range(5)]
        status = await cluster.status("tiny")  # before any engine reported: estimates only
        outs = await asyncio.gather(*(read(cluster, r) for r in rids))
        return rids, outs, status

    before = len(cluster.stats.placements)
    ids, outs, status = asyncio.run(main())
    placed = [(p.request_id, p.engine_id) for p in list(cluster.stats.placements)[before:]]
    # The busiest engine with room takes each request: engine 0 fills up first, then engine 1;
    # the fifth waits (FCFS) until a request finishes and then goes where there is room.
    assert placed[:4] == [(ids[0], 0), (ids[1], 0), (ids[2], 1), (ids[3], 1)]
    assert placed[4][0] == ids[4]
    assert status["queued"] == 1 and status["idle_engines"] == []
    assert [e["running"] for e in status["engines"]] == [MAX_BATCH, MAX_BATCH]
    assert status["engines"][0]["requests_by_adapter"] == {"tiny": 2}
    for updates in outs:
        assert_continuous(updates)
        assert len(updates[-1].token_ids) == 12
    idle = wait_idle(cluster, 2)
    assert idle["idle_engines"] == [0, 1] and idle["in_flight"] == 0
    assert [e["free_blocks"] for e in idle["engines"]] == [NUM_BLOCKS, NUM_BLOCKS]


def test_a_client_that_leaves_frees_its_engine(cluster: ClusterEngine) -> None:
    async def main() -> None:
        rid = cluster.open([9, 8, 7], greedy(40), None)
        stream = cluster.stream(rid)
        first = await stream.__anext__()
        assert first.token_ids and not first.finished
        await stream.aclose()

    asyncio.run(main())
    idle = wait_idle(cluster, 2)
    assert idle["idle_engines"] == [0, 1] and cluster.in_flight == 0
    assert [e["free_blocks"] for e in idle["engines"]] == [NUM_BLOCKS, NUM_BLOCKS]


def test_migrated_request_equals_unmigrated_output(cluster: ClusterEngine,
                                                   reference: LLMEngine) -> None:
    prompts = [list(range(10, 20)), list(range(30, 40))]  # 10 + 45 tokens each: 4 blocks
    want = offline(reference, prompts, greedy(45))

    async def main() -> list[list[RequestOutput]]:
        rids = [cluster.open(p, greedy(45), None) for p in prompts]
        return await asyncio.gather(*(read(cluster, r) for r in rids))

    migrations = cluster.stats.migrations
    before, stalls = len(cluster.stats.placements), len(cluster.stats.stalls)
    start = time.monotonic()
    outs = asyncio.run(main())
    elapsed = time.monotonic() - start
    placed = list(cluster.stats.placements)[before:]
    # Both start on engine 0; when its 6 blocks run out it hands back the newer request,
    # which resumes on engine 1 by recomputing its prompt and tokens so far.
    assert [(p.engine_id, p.why) for p in placed] == [(0, "new"), (0, "new"), (1, "migrated")]
    assert cluster.stats.migrations == migrations + 1
    assert placed[2].request_id == placed[1].request_id
    # The migration's added latency was measured once: a gap within the requests' lifetime.
    assert len(cluster.stats.stalls) == stalls + 1
    assert 0 < cluster.stats.stalls[-1] < elapsed
    status = asyncio.run(cluster.status())
    assert status["migration_stalls_s"][-1] == cluster.stats.stalls[-1]
    assert [e["num_blocks"] for e in status["engines"]] == [NUM_BLOCKS, NUM_BLOCKS]
    for updates, tokens in zip(outs, want, strict=True):
        assert_continuous(updates)
        assert updates[-1].token_ids == tokens
    wait_idle(cluster, 2)


def test_killed_engine_loses_no_request(local_ray: None, spec: EngineSpec,
                                        reference: LLMEngine) -> None:
    roomy = replace(spec, config=replace(spec.config, cache=CacheConfig()))  # no migration
    cluster = start_cluster(roomy, ClusterConfig(num_engines=2, cpus_per_engine=1,
                                                 restart_engines=False))
    prompts = [[3 + i, 4, 5, 6] for i in range(3)]
    want = offline(reference, prompts, greedy(50))
    rids: list[str] = []

    async def main() -> list[list[RequestOutput]]:
        rids.extend(cluster.open(p, greedy(50), None) for p in prompts)
        streams = [cluster.stream(r) for r in rids]
        firsts = [[await s.__anext__()] for s in streams]  # every request is under way
        # Hold engine 0's thread (its requests cannot finish meanwhile), then kill it: it holds
        # the first two requests, unfinished, whatever the machine's speed.
        cluster.actors[0].call.remote(lambda e: time.sleep(30))
        await asyncio.sleep(0.5)
        ray.kill(cluster.actors[0])

        async def rest(stream: object) -> list[RequestOutput]:
            return [out async for out in stream]

        tails = await asyncio.gather(*(rest(s) for s in streams))
        return [f + t for f, t in zip(firsts, tails, strict=True)]

    try:
        outs = asyncio.run(main())
        status = asyncio.run(cluster.status())
        assert cluster.healthy()  # engine 1 lives
        ray.kill(cluster.actors[1])  # now none does: unhealthy, and new requests get 503
        deadline = time.monotonic() + 20
        while cluster.healthy() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not cluster.healthy()

        async def refused() -> None:
            with pytest.raises(EngineUnavailableError):
                cluster.open([1, 2], greedy(2), None)
        asyncio.run(refused())
    finally:
        cluster.shutdown()
    for updates, tokens in zip(outs, want, strict=True):
        assert_continuous(updates)
        assert updates[-1].token_ids == tokens
    assert status["engines"][0]["alive"] is False and status["recoveries"] == 2
    recovered = [p for p in cluster.stats.placements if p.why == "recovered"]
    assert sorted(p.request_id for p in recovered) == rids[:2]
    assert {p.engine_id for p in recovered} == {1}
    by_engine = Counter(p.engine_id for p in cluster.stats.placements)
    assert status["placements_per_engine"] == {str(e): by_engine[e] for e in (0, 1)}


def wait_for(condition: object, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_dead_engines_restart_with_the_clusters_adapters(local_ray: None, spec: EngineSpec,
                                                         model_dir: Path,
                                                         tmp_path: Path) -> None:
    """Kill one engine, then both: each is started again (with backoff), holds the adapter
    loaded after the cluster started, and serves; health and status say so throughout."""
    late = save_adapter(model_dir, tmp_path / "late", 3, **ADAPTERS["qv8"])
    cluster = start_cluster(spec, ClusterConfig(num_engines=2, cpus_per_engine=1))

    def alive() -> list[bool]:
        return [e["alive"] for e in asyncio.run(cluster.status())["engines"]]

    def adapters(eid: int) -> list[str]:
        return ray.get(cluster.actors[eid].call.remote(lambda e: e.list_loras())).value

    async def serve(adapter: str | None) -> list[RequestOutput]:
        return [out async for out in cluster.generate([1, 2, 3], greedy(4), adapter)]

    try:
        cluster.engine.load_lora("late", str(late))
        ray.kill(cluster.actors[0])
        wait_for(lambda: cluster.stats.restarts == 1 and alive() == [True, True])
        assert cluster.healthy() and "late" in adapters(0)
        ray.kill(cluster.actors[0])
        ray.kill(cluster.actors[1])
        wait_for(lambda: cluster.stats.restarts == 3 and alive() == [True, True])
        assert cluster.healthy() and all("late" in adapters(e) for e in (0, 1))
        assert len(asyncio.run(serve("late"))[-1].token_ids) == 4
        status = asyncio.run(cluster.status())
        assert status["restarts"] == 3 and status["recoveries"] == 0
    finally:
        cluster.shutdown()
