"""What the frontend believes an engine's load is: its last report plus the placements sent to
it since that the engine has not taken in yet (so a burst of requests is placed correctly
between two reports)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from punica.cluster.policy import ClusterRequest, EngineState


@dataclass
class EngineLoad:
    reported: EngineState
    resident: tuple[str, ...] = ()
    alive: bool = True
    in_transit: dict[int, ClusterRequest] = field(default_factory=dict)
    """Placement number -> request, sent to the engine and not yet in one of its reports."""

    @property
    def engine_id(self) -> int:
        return self.reported.engine_id

    def sent(self, number: int, request: ClusterRequest) -> None:
        self.in_transit[number] = request

    def absorb(self, state: EngineState, applied: list[int], resident: tuple[str, ...]) -> None:
        """A report: its state already counts the placements it applied."""
        for number in applied:
            self.in_transit.pop(number, None)
        self.reported, self.resident = state, resident

    def estimate(self) -> EngineState:
        s = self.reported
        if not self.in_transit:
            return replace(s, alive=self.alive)
        adapters = dict(s.adapters)
        running, free = s.running, s.free_blocks
        for r in self.in_transit.values():
            running += r.num_seqs
            free -= r.blocks(s.block_size)
            adapters[r.adapter] = adapters.get(r.adapter, 0) + r.num_seqs
        return EngineState(s.engine_id, s.max_batch, running, max(0, free), s.block_size,
                           adapters, self.alive)

    @property
    def idle(self) -> bool:
        return self.alive and self.reported.running == 0 and not self.in_transit

    def describe(self, base_name: str) -> dict:
        """For /cluster/status (requests of the base model count under `base_name`)."""
        s = self.estimate()
        by_adapter = sorted(s.adapters.items(), key=lambda kv: "" if kv[0] is None else kv[0])
        return {"engine_id": s.engine_id, "alive": self.alive, "idle": self.idle,
                "running": s.running, "max_batch": s.max_batch, "free_blocks": s.free_blocks,
                "block_size": s.block_size,
                "requests_by_adapter": {base_name if a is None else a: n for a, n in by_adapter},
                "resident_adapters": list(self.resident)}
