"""`punica bench serve` against the test server: every request succeeds and is measured."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from punica.bench.serve import PER_REQUEST, interarrival_rates
from punica.cli import main
from tests.server.conftest import API_KEY, Running, punica_serve


def test_bench_serve_smoke(server: Running, tmp_path: Path) -> None:
    rc = main(["bench", "serve", "--url", server.url, "--api-key", API_KEY, "--rate", "50",
               "--num-requests", "12", "--mix", "uniform", "--maxlen", "40", "--vocab", "300",
               "--out-dir", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "serve.json").read_text())
    assert result["ok"] == result["requests"] == 12
    assert result["ttft_s"]["p50"] > 0 and result["e2e_s"]["p99"] >= result["e2e_s"]["p50"]
    assert result["output_tok_s"] > 0 and result["command"].startswith("punica bench serve")
    assert result["errors"] == {} and result["error_sample"] is None
    assert len(result["per_request"]) == 12 and (tmp_path / "serve.png").stat().st_size > 0
    rows = result["per_request"]
    assert all(set(r) == set(PER_REQUEST) for r in rows)
    assert all(0 <= r["max_gap"] <= r["e2e"] and 0 <= r["adapter"] for r in rows)
    assert sorted(r["arrival"] for r in rows) == [r["arrival"] for r in rows]  # sent in order


def test_rate_ramp_sends_faster_and_faster(server: Running, tmp_path: Path) -> None:
    rc = main(["bench", "serve", "--url", server.url, "--api-key", API_KEY, "--rate-ramp",
               "20:400", "--num-requests", "16", "--maxlen", "24", "--vocab", "300",
               "--out-dir", str(tmp_path)])
    result = json.loads((tmp_path / "serve.json").read_text())
    assert rc == 0 and result["ok"] == 16 and result["rate_ramp"] == "20:400"
    arrivals = [r["arrival"] for r in result["per_request"]]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    # expovariate gaps, means 50 ms down to 2.5 ms: the first half waits longer in total
    assert sum(gaps[:7]) > sum(gaps[8:])
    assert result["start_unix"] > 1.7e9


def test_interarrival_rates() -> None:
    def ns(rate: float, ramp: str | None, n: int) -> argparse.Namespace:
        return argparse.Namespace(rate=rate, rate_ramp=ramp, num_requests=n)

    assert interarrival_rates(ns(5.0, None, 3)) == [5.0, 5.0, 5.0]
    assert interarrival_rates(ns(0.0, "1:3", 5)) == [1.0, 1.5, 2.0, 2.5, 3.0]
    assert interarrival_rates(ns(0.0, "2:2", 1)) == [2.0]
    for bad in ("1", "a:b", "0:4", "1:-1"):
        with pytest.raises(SystemExit, match="--rate-ramp"):
            interarrival_rates(ns(0.0, bad, 4))


def test_failed_requests_are_counted_by_status(server: Running, tmp_path: Path) -> None:
    # token ids past the test model's vocabulary: every request is refused with 400
    rc = main(["bench", "serve", "--url", server.url, "--api-key", API_KEY, "--rate", "0",
               "--num-requests", "4", "--mix", "identical", "--maxlen", "40", "--vocab",
               "100000", "--seed", "3", "--out-dir", str(tmp_path)])
    result = json.loads((tmp_path / "serve.json").read_text())
    assert rc == 1 and result["ok"] == 0 and result["errors"] == {"400": 4}
    assert "token ids" in result["error_sample"] and result["per_request"] == []


def test_random_weights_server_with_random_adapters(tmp_path: Path) -> None:
    with punica_serve("--model", "random:tiny", "--random-adapters", "3", "--device", "cpu",
                      "--max-model-len", "64") as url:
        rc = main(["bench", "serve", "--url", url, "--rate", "0", "--num-requests", "9",
                   "--mix", "distinct", "--maxlen", "40", "--vocab", "200", "--out-dir",
                   str(tmp_path)])
    result = json.loads((tmp_path / "serve.json").read_text())
    assert rc == 0 and result["ok"] == 9 and result["adapters_used"] == 3
    # No tokenizer, so no text: tokens still stream one chunk each, and the first comes first.
    multi = [r for r in result["per_request"] if r["tokens"] > 1]
    assert multi and all(r["ttft"] < r["e2e"] for r in multi)


def test_a_stream_that_fails_midway_is_a_failure(server: Running) -> None:
    """An error event inside a 200 stream (here: the adapter unloaded mid-stream) counts as a
    failed request with its code, not as a success."""
    import asyncio

    import httpx

    from punica.bench.serve import one

    headers = {"Authorization": f"Bearer {API_KEY}"}

    async def main() -> dict:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            r = await client.post("/v1/load_lora_adapter", headers=headers,
                                  json={"lora_name": "doomed", "lora_path": "qv8"})
            assert r.status_code == 200, r.text
            run = asyncio.create_task(one(client, "doomed", [1, 2, 3], 58, headers))
            for _ in range(2000):  # until it runs (at most ~10 s)
                if "punica_requests_running 1.0" in (await client.get(
                        "/metrics", headers=headers)).text:
                    break
                await asyncio.sleep(0.005)
            await client.post("/v1/unload_lora_adapter", headers=headers,
                              json={"lora_name": "doomed"})
            return await run

    result = asyncio.run(main())
    assert result["error"] == 404.0 and "unloaded" in result["message"]
