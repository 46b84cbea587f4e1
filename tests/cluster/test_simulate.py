"""The cluster simulator: conservation under migration, consolidation, the step-model fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from punica.cluster.simulate import SimConfig, Simulator, make_trace, trace_of
from punica.cluster.step_model import StepModel


@pytest.mark.parametrize("policy", ["punica", "round-robin", "least-loaded"])
def test_every_request_finishes_once_even_with_migrations(policy: str) -> None:
    cfg = SimConfig(gpus=3, duration_s=120.0, peak_rate=6.0, kv_tokens=6000, maxlen=1024,
                    seed=3)
    trace = make_trace(cfg)
    sim = Simulator(cfg, StepModel(), policy)
    sim.run(trace)
    assert trace and all(r.finish is not None and r.generated == r.output for r in trace)
    assert all(r.first_token is not None and r.arrival <= r.first_token <= r.finish
               for r in trace)
    if policy == "punica":
        assert sim.migrations > 0  # consolidation on small KV pools forced some
    assert sim.migrations == sum(r.migrations for r in trace)
    # A migration of a request that had tokens adds one stall, ended by its next token.
    assert len(sim.stalls) <= sim.migrations and all(s > 0 for s in sim.stalls)
    assert all(r.migrated_at is None for r in trace)
    if policy == "punica":
        assert sim.stalls
    assert all(not g.running and g.kv == 0 for g in sim.gpus)
    assert not sim.queue


def test_punica_uses_fewer_gpus_than_round_robin_at_low_load() -> None:
    cfg = SimConfig(gpus=8, duration_s=600.0, peak_rate=3.0, seed=1)
    used = {}
    for policy in ("punica", "round-robin"):
        trace = make_trace(cfg)
        sim = Simulator(cfg, StepModel(), policy)
        sim.run(trace)
        assert all(r.finish is not None for r in trace)
        samples = [sum(1 for b in batch if b) for _, batch in sim.samples]
        used[policy] = sum(samples) / len(samples)
    assert used["punica"] < 0.6 * used["round-robin"]


def test_step_model_fit_recovers_coefficients(tmp_path: Path) -> None:
    truth = StepModel(3e-3, 4e-5, 2e-5, 1e-7)
    rows = []
    for batch in (1, 8, 32, 64):
        for ctx in (512, 2048):
            rows.append({"kind": "decode", "batch": batch, "context": ctx,
                         "step_ms": truth.step_s(batch, 0, batch * ctx) * 1e3})
    rows.append({"kind": "prefill", "batch": 4, "context": 2048,
                 "step_ms": truth.step_s(0, 8192, 8192) * 1e3})
    path = tmp_path / "decode.json"
    path.write_text(json.dumps({"rows": rows + [{"kind": "decode", "skipped": "x"}]}))
    fit = StepModel.fit(path)
    for name in ("c0", "c_batch", "c_prefill", "c_kv"):
        assert getattr(fit, name) == pytest.approx(getattr(truth, name), rel=1e-6)


def test_trace_of_replays_recorded_requests_in_arrival_order() -> None:
    rows = [{"arrival": 0.5, "adapter": 2, "prompt": 7, "tokens": 3, "ttft": 0.1},
            {"arrival": 0.0, "adapter": 0, "prompt": 4, "tokens": 0, "ttft": 0.1}]
    trace = trace_of(rows)
    assert [(r.rid, r.arrival, r.adapter, r.prompt, r.output) for r in trace] == [
        (0, 0.0, 0, 4, 1), (1, 0.5, 2, 7, 3)]  # no request asks for fewer than one token
    sim = Simulator(SimConfig(gpus=1, kv_tokens=4096), StepModel(), "punica")
    sim.run(trace)
    assert all(r.finish is not None and r.generated == r.output for r in trace)
