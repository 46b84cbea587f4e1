"""200 concurrent streaming clients, a quarter hanging up after their first chunk: every other
request completes, and afterwards no KV block, running request or adapter pin is left
(read from /metrics)."""

from __future__ import annotations

import asyncio
import re
import time

import httpx

from tests.server.conftest import API_KEY, Running

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def gauge(text: str, name: str) -> float:
    match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
    assert match, f"{name} missing from /metrics"
    return float(match[1])


async def one(client: httpx.AsyncClient, i: int) -> str | None:
    body = {"model": "qv8" if i % 2 else "tiny-llama", "prompt": [1 + i % 50, 2, 3],
            "max_tokens": 8, "temperature": 0.0, "stream": True, "ignore_eos": True}
    async with client.stream("POST", "/v1/completions", json=body, headers=HEADERS) as r:
        assert r.status_code == 200
        finish = None
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if i % 4 == 3:
                return "hung up"  # leave mid-stream: the context exit closes the connection
            if '"finish_reason":"length"' in line.replace(" ", ""):
                finish = "length"
        return finish


def test_many_streams_with_disconnects(server: Running) -> None:
    async def main() -> list[str | None]:
        limits = httpx.Limits(max_connections=250)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(200)))

    results = asyncio.run(main())
    assert results.count("hung up") == 50
    assert results.count("length") == 150
    deadline = time.time() + 30
    while True:
        text = httpx.get(f"{server.url}/metrics",
                         headers={"Authorization": f"Bearer {API_KEY}"}).text
        idle = (gauge(text, "punica_requests_running") == 0
                and gauge(text, "punica_requests_waiting") == 0
                and gauge(text, "punica_kv_blocks_used") == 0
                and gauge(text, "punica_adapter_slots_pinned") == 0)
        if idle or time.time() > deadline:
            break
        time.sleep(0.2)
    assert idle, text
    assert 'punica_requests_total{adapter="qv8",reason="length"}' in text
    assert "punica_time_to_first_token_seconds_bucket" in text
