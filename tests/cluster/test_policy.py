"""Punica's cluster policy on hand-built cluster states: exact placements and migrations."""

from __future__ import annotations

from punica.cluster.policy import (
    ClusterQueue,
    ClusterRequest,
    EngineState,
    choose_engine,
    migration_victim,
)


def req(i: int, adapter: str | None = "a", tokens: int = 31) -> ClusterRequest:
    return ClusterRequest(f"r{i}", adapter, tokens, arrival=i)


def test_busiest_engine_with_room_wins() -> None:
    engines = [EngineState(0, 32, 5, 100), EngineState(1, 32, 20, 100),
               EngineState(2, 32, 31, 100), EngineState(3, 32, 32, 100)]
    assert choose_engine(req(1), engines) == 2  # 3 is full, 2 is the busiest with room


def test_free_blocks_and_liveness_gate_placement() -> None:
    engines = [EngineState(0, 32, 30, 1), EngineState(1, 32, 10, 2),
               EngineState(2, 32, 25, 50, alive=False)]
    # 31 tokens + 1 next -> 2 blocks of 16: engine 0 lacks blocks, 2 is dead
    assert choose_engine(req(1), engines) == 1
    assert choose_engine(req(2, tokens=40), engines) is None


def test_ties_prefer_the_same_adapter_then_the_lowest_id() -> None:
    engines = [EngineState(0, 8, 4, 50, adapters={"b": 4}),
               EngineState(1, 8, 4, 50, adapters={"a": 1, "b": 3}),
               EngineState(2, 8, 4, 50, adapters={"a": 1, None: 3})]
    assert choose_engine(req(1, "a"), engines) == 1
    assert choose_engine(req(2, "c"), engines) == 0
    assert choose_engine(req(3, None), engines) == 2


def test_queue_places_a_burst_and_keeps_fcfs() -> None:
    q = ClusterQueue()
    for i in range(5):
        q.submit(req(i, tokens=15))  # one block each
    engines = [EngineState(0, 2, 0, 10), EngineState(1, 3, 1, 10)]
    placed = [(r.request_id, e) for r, e in q.place(engines)]
    # engine 1 is busier (1 running): it fills to 3, then engine 0 takes two
    assert placed == [("r0", 1), ("r1", 1), ("r2", 0), ("r3", 0)]
    assert len(q) == 1
    assert q.place(engines=[EngineState(0, 2, 2, 8), EngineState(1, 3, 3, 7)]) == []


def test_migration_takes_the_newest_and_requeues_it_first() -> None:
    running = [req(3, tokens=40), req(9, tokens=70), req(5, tokens=12)]
    victim = migration_victim(running)
    assert victim.request_id == "r9"
    q = ClusterQueue()
    q.submit(req(10))
    q.requeue_migrated(victim)
    placed = q.place([EngineState(0, 4, 1, 3), EngineState(1, 4, 0, 10)])
    # r9 needs 5 blocks: only engine 1 fits it; r10 (2 blocks) ties on load and joins its
    # adapter ("a") on engine 1
    assert [(r.request_id, e) for r, e in placed] == [("r9", 1), ("r10", 1)]
    assert migration_victim([]) is None


def test_a_migrated_request_prefers_another_engine_over_its_source() -> None:
    engines = [EngineState(0, 8, 5, 40), EngineState(1, 8, 2, 40), EngineState(2, 8, 8, 40)]
    moved = ClusterRequest("m", "a", 31, arrival=7, source=0)
    assert choose_engine(moved, engines) == 1  # 0 is busier, but it handed the request back
    only_source = [EngineState(0, 8, 5, 40), EngineState(1, 8, 8, 40)]
    assert choose_engine(moved, only_source) == 0  # nowhere else: recomputed where it was
    assert choose_engine(ClusterRequest("m", "a", 31, arrival=7), engines) == 0


def test_queue_counts_every_sequence_and_discards_a_request_that_left() -> None:
    q = ClusterQueue()
    q.submit(ClusterRequest("n3", None, 15, arrival=0, num_seqs=3))
    q.submit(req(1, tokens=15))
    q.submit(req(2, tokens=15))
    assert q.discard("r1") and not q.discard("r1") and len(q) == 2
    placed = q.place([EngineState(0, 4, 0, 10), EngineState(1, 4, 3, 10)])
    # n3 joins the busier engine 1 (3 + 3 > 4 is not checked: a batch below max takes it);
    # engine 1 then runs 6 >= 4, so r2 goes to engine 0
    assert [(r.request_id, e) for r, e in placed] == [("n3", 1), ("r2", 0)]
