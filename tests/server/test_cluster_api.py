"""`punica cluster`'s own route: /cluster/status shows each engine's load and the idle ones."""

from __future__ import annotations

import time

import httpx

from tests.server.conftest import API_KEY, Running


def status(url: str) -> dict:
    r = httpx.get(f"{url}/cluster/status", timeout=10,
                  headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200, r.text
    return r.json()


def test_status_shows_the_busy_engine_and_the_idle_one(cluster_server: Running) -> None:
    url = cluster_server.url
    placed = status(url)["placements_per_engine"]  # the session's server served other tests
    body = {"model": "qv8", "prompt": [4, 5, 6], "max_tokens": 50, "temperature": 0.0,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert '"text"' in first
        busy = status(url)
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    # one request: on engine 0 (lowest id among equally loaded), engine 1 stays idle
    assert [e["engine_id"] for e in busy["engines"]] == [0, 1]
    assert busy["engines"][0]["running"] == 1 and busy["idle_engines"] == [1]
    assert busy["engines"][0]["requests_by_adapter"] == {"qv8": 1}
    assert "qv8" in busy["engines"][0]["resident_adapters"]
    deadline = time.time() + 30
    while (idle := status(url))["idle_engines"] != [0, 1] and time.time() < deadline:
        time.sleep(0.2)
    assert idle["idle_engines"] == [0, 1] and idle["in_flight"] == 0 and idle["queued"] == 0
    assert all(e["alive"] and e["running"] == 0 for e in idle["engines"])
    assert idle["placements_per_engine"] == {"0": placed["0"] + 1, "1": placed["1"]}
