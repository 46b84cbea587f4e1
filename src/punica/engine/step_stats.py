"""Where an engine's steps spend their time, on the host clock: the breakdown the text-generation
benchmark records beside its throughput.

A step is synchronous: the GPU idles while the host schedules and builds the next batch and while
it checks stops, and the host waits while the GPU runs (inside sampling, whose `.tolist()` is the
step's one synchronisation). So `schedule` + `finish` is host time the GPU sits out, and `sample`
holds the GPU's time that the host did not already cover by launching.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class StepStats:
    steps: int = 0
    graph_steps: int = 0
    """Steps replayed from a CUDA graph."""
    eager_steps: int = 0
    """Steps run op by op (no graph fits them, or graphs are off)."""
    schedule_s: float = 0.0
    """Scheduling, adapter loads and the batch build (host; the GPU is idle)."""
    forward_s: float = 0.0
    """Launching the forward pass (graph: input copies and replay; eager: every op's launch)."""
    sample_s: float = 0.0
    """Sampling, including the wait for the GPU to finish the step."""
    finish_s: float = 0.0
    """Stop checks, finished requests and outputs (host; the GPU is idle)."""

    def reset(self) -> None:
        for f in fields(self):
            setattr(self, f.name, f.default)

    def summary(self) -> dict[str, float]:
        """Counts, and each phase's mean per step in milliseconds."""
        n = max(self.steps, 1)
        out: dict[str, float] = {"steps": self.steps, "graph_steps": self.graph_steps,
                                 "eager_steps": self.eager_steps}
        for name in ("schedule", "forward", "sample", "finish"):
            out[f"{name}_ms"] = getattr(self, f"{name}_s") / n * 1e3
        out["host_idle_ms"] = (self.schedule_s + self.finish_s) / n * 1e3
        return out
