"""Adapters read off the step thread and just-in-time adapters named below a root (issue 18):
no step waits for a file, concurrent first requests read an adapter once, a failed read fails
only its adapter's requests, the host cache is bounded in adapters and bytes."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from punica.config import CacheConfig, EngineConfig, LoraConfig, ModelConfig
from punica.engine.llm_engine import LLMEngine
from punica.engine.outputs import RequestOutput
from punica.engine.sampling_params import SamplingParams
from punica.errors import AdapterLoadError, AdapterNotFoundError
from punica.lora.registry import AdapterRegistry, jit_path, weights_bytes
from tests.checkpoints import ADAPTERS, save_adapter, save_model

GREEDY = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
OTHERS = [("o-base", [5, 6, 7], None), ("o-a", [8, 9, 10, 11], "org/a")]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A base model and a root of adapters: org/a, org/b, c (nested names), bad (a rank that
    contradicts its config)."""
    tmp = tmp_path_factory.mktemp("fleet")
    base = save_model(tmp / "m", "llama")
    root = tmp / "loras"
    for i, name in enumerate(("org/a", "org/b", "c")):
        save_adapter(base, root / name, i + 1, **ADAPTERS["qv8"])
    bad = save_adapter(base, root / "bad", 9, **ADAPTERS["qv8"])
    cfg = (bad / "adapter_config.json").read_text().replace('"r": 8', '"r": 4')
    (bad / "adapter_config.json").write_text(cfg)
    return base, root


def engine(base: Path, root: Path, max_loras: int = 2, max_cpu_loras: int | None = None,
           max_cpu_lora_bytes: int | None = None, threads: int = 2) -> LLMEngine:
    return LLMEngine(EngineConfig(
        ModelConfig(str(base), "float32", "cpu", 64),
        lora=LoraConfig(max_loras, 16, max_cpu_loras, max_cpu_lora_bytes=max_cpu_lora_bytes,
                        loader_threads=threads, lora_root=str(root))))


def drive(eng: LLMEngine, limit_s: float = 60) -> dict[str, RequestOutput]:
    """Step until nothing is unfinished, sleeping while every request waits for an adapter's
    files."""
    done: dict[str, RequestOutput] = {}
    deadline = time.monotonic() + limit_s
    while eng.has_unfinished():
        assert time.monotonic() < deadline, "requests still unfinished"
        if eng.waiting_on_reads():
            time.sleep(0.002)
            continue
        for out in eng.step(updates=False):
            done[out.request_id] = out
    return done


@pytest.fixture(scope="module")
def alone(fleet: tuple[Path, Path]) -> dict[str, list[int]]:
    """Each request's tokens on a fresh engine, one at a time, adapters read on the step
    thread."""
    base, root = fleet
    eng = engine(base, root, threads=0)
    out = {}
    for rid, prompt, adapter in [*OTHERS, ("slow", [3, 4], "org/b"), ("c", [3, 4], "c")]:
        eng.add_request(rid, prompt, GREEDY, adapter)
        out[rid] = drive(eng)[rid].token_ids
    return out


def test_jit_names_resolve_below_the_root_only(fleet: tuple[Path, Path],
                                               tmp_path: Path) -> None:
    _, root = fleet
    assert jit_path(str(root), "org/a") == (root / "org" / "a").resolve()
    assert jit_path(str(root), "c") is not None
    for name in ("../loras/c", "/etc", "org//a", "org/./a", "org", "missing", "", "a\0b",
                 "org\\a", "x" * 600):
        assert jit_path(str(root), name) is None, name
    assert jit_path(None, "c") is None
    os.symlink(root / "c", tmp_path / "link")  # a link out of another root
    assert jit_path(str(tmp_path), "link") is None


def test_a_slow_read_delays_no_other_request(fleet: tuple[Path, Path],
                                             alone: dict[str, list[int]],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """While org/b's files take as long as the test wants, the other tenants' requests run to
    their end (the engine never waits for the read), then org/b's request runs."""
    base, root = fleet
    eng = engine(base, root)
    release, reading = threading.Event(), threading.Event()
    real_read = eng.registry._read

    def slow_read(name: str, src: object) -> object:
        if name == "org/b":
            reading.set()
            assert release.wait(30)
        return real_read(name, src)

    monkeypatch.setattr(eng.registry, "_read", slow_read)
    eng.add_request("slow", [3, 4], GREEDY, "org/b")
    for rid, prompt, adapter in OTHERS:
        eng.add_request(rid, prompt, GREEDY, adapter)
    assert reading.wait(10)  # org/b's read started when its request was queued (prefetch)
    done: dict[str, RequestOutput] = {}
    deadline = time.monotonic() + 30
    while len(done) < len(OTHERS):
        assert time.monotonic() < deadline, "the other tenants' requests did not finish"
        done |= {o.request_id: o for o in eng.step(updates=False)}
    assert eng.registry.loading() == ["org/b"]  # still reading: nobody waited for it
    assert {rid: done[rid].token_ids for rid, _, _ in OTHERS} == \
        {rid: alone[rid] for rid, _, _ in OTHERS}
    assert eng.scheduler.waiting and not eng.scheduler.running  # queued, holding no KV
    assert eng.scheduler.blocks.num_free == eng.scheduler.blocks.num_blocks
    release.set()
    assert drive(eng)["slow"].token_ids == alone["slow"]
    assert all(v == 0 for v in eng.leftovers().values())


def test_concurrent_first_requests_read_once(fleet: tuple[Path, Path],
                                             alone: dict[str, list[int]],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    base, root = fleet
    eng = engine(base, root)
    reads = []
    real_read = eng.registry._read

    def counted(name: str, src: object) -> object:
        reads.append(name)
        return real_read(name, src)

    monkeypatch.setattr(eng.registry, "_read", counted)
    for i in range(6):
        eng.add_request(f"c{i}", [3, 4], GREEDY, "c")
    done = drive(eng)
    assert reads == ["c"] and eng.list_loras() == ["c"]
    assert all(done[f"c{i}"].token_ids == alone["c"] for i in range(6))


def test_a_failed_read_fails_only_its_adapter(fleet: tuple[Path, Path],
                                              alone: dict[str, list[int]]) -> None:
    base, root = fleet
    eng = engine(base, root)
    eng.add_request("bad1", [3, 4], GREEDY, "bad")
    for rid, prompt, adapter in OTHERS:
        eng.add_request(rid, prompt, GREEDY, adapter)
    eng.add_request("bad2", [5], GREEDY, "bad")
    done = drive(eng)
    for rid in ("bad1", "bad2"):
        assert isinstance(done[rid].error, AdapterLoadError) and "rank" in str(done[rid].error)
        assert done[rid].outputs[0].finish_reason == "error"
    assert {rid: done[rid].token_ids for rid, _, _ in OTHERS} == \
        {rid: alone[rid] for rid, _, _ in OTHERS}
    assert "bad" not in eng.list_loras()  # unregistered: a fixed folder is read afresh
    assert all(v == 0 for v in eng.leftovers().values())
    with pytest.raises(AdapterNotFoundError):
        eng.add_request("nope", [1], GREEDY, "org/missing")


def test_the_host_cache_is_bounded_and_every_tier_recovers(fleet: tuple[Path, Path],
                                                           alone: dict[str, list[int]]) -> None:
    """One GPU slot and one host entry (by bytes) for three adapters requested in turn, many
    times: every request still gets its alone tokens, and the evictions happened."""
    base, root = fleet
    probe = AdapterRegistry(engine(base, root).arch, 16, 4, False)
    one = weights_bytes(probe.add("c", str(root / "c")))
    eng = engine(base, root, max_loras=1, max_cpu_lora_bytes=one)
    order = [("o-a", [8, 9, 10, 11], "org/a"), ("c", [3, 4], "c"), ("slow", [3, 4], "org/b")]
    for turn in range(4):
        for rid, prompt, adapter in order:
            eng.add_request(f"{rid}#{turn}", prompt, GREEDY, adapter)
            assert drive(eng)[f"{rid}#{turn}"].token_ids == alone[rid]
    stats = eng.registry.stats
    assert eng.registry.cached_bytes <= one and len(eng.registry.cached()) == 1
    assert stats["host_evictions"] >= 10 and stats["disk_loads"] == 12
    assert eng.stats["adapter_evictions"] >= 10


def test_review_cases_stale_reads_resident_slots_fcfs_and_sync_reads(
        fleet: tuple[Path, Path], alone: dict[str, list[int]], tmp_path: Path) -> None:
    """(a) an adapter in a GPU slot but out of host memory is not read again for a new request,
    and its running request is not failed by a read; (b) a ready request at the head that does
    not fit keeps FCFS even while a later request's adapter is read (its host copy is not
    evicted for the newcomer); (c) with reads on the step thread a failing folder's error names
    no absolute path and the folder is not kept."""
    base, root = fleet
    # (a) one host entry, two GPU slots
    eng = engine(base, root, max_loras=2, max_cpu_loras=1)
    eng.add_request("first", [8, 9, 10, 11], GREEDY, "org/a")
    drive(eng)
    eng.add_request("evict", [3, 4], GREEDY, "c")  # org/a leaves host memory, stays in a slot
    drive(eng)
    assert eng.registry.cached() == ["c"] and eng.slots.is_filled("org/a")
    reads = eng.registry.stats["disk_loads"]
    eng.add_request("o-a", [8, 9, 10, 11], GREEDY, "org/a")
    assert drive(eng)["o-a"].token_ids == alone["o-a"]
    assert eng.registry.stats["disk_loads"] == reads  # served from its slot, no read
    # (b) strict FCFS for a ready head: 5 blocks of 16 tokens, the head needs 6
    small = LLMEngine(EngineConfig(
        ModelConfig(str(base), "float32", "cpu", 128),
        cache=CacheConfig(num_blocks=9),
        lora=LoraConfig(2, 16, 1, loader_threads=2, lora_root=str(root))))
    small.add_request("hog", list(range(1, 65)), SamplingParams(max_tokens=40,
                                                                 temperature=0.0), None)
    small.step(updates=False)  # hog holds blocks
    small.add_request("head", list(range(1, 81)), GREEDY, "org/a")
    while not small.registry.ready("org/a"):
        time.sleep(0.01)
        small.waiting_on_reads()
    small.add_request("late", [3, 4], GREEDY, "org/b")
    time.sleep(0.3)
    small.step(updates=False)
    assert [s.request_id for s in small.scheduler.running] == ["hog"]  # late did not overtake
    assert "org/a" in small.registry.cached()  # the head's host copy was kept
    done = drive(small)
    assert done["head"].token_ids and done["late"].token_ids == alone["slow"]
    # (c) reads on the step thread
    sync = engine(base, root, threads=0)
    sync.add_request("b", [3, 4], GREEDY, "bad")
    out = drive(sync)["b"]
    assert isinstance(out.error, AdapterLoadError) and str(root.resolve()) not in str(out.error)
    assert "bad" not in sync.list_loras()


def test_an_explicit_load_can_be_parsed_off_the_engine_thread(
        fleet: tuple[Path, Path], alone: dict[str, list[int]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """parse_lora (any thread) then load_lora(parsed=...) (the engine thread) registers without
    reading a file there: the server's load endpoint does this."""
    import punica.lora.registry as registry_module

    base, root = fleet
    eng = engine(base, root)
    weights = eng.parse_lora("mine", str(root / "org" / "b"), str(root))

    def no_reads(*args: object, **kwargs: object) -> object:
        raise AssertionError("the engine thread read adapter files")

    monkeypatch.setattr(registry_module, "load_adapter", no_reads)
    eng.load_lora("mine", str(root / "org" / "b"), str(root), parsed=weights)
    eng.add_request("slow", [3, 4], GREEDY, "mine")
    assert drive(eng)["slow"].token_ids == alone["slow"]
    assert eng.registry.sources["mine"].stamps == weights.stamps
