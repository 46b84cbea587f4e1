"""Scheduling policies through the server: under --scheduling-policy fair a tenant's flood does
not hold back another tenant; a request priority needs --scheduling-policy priority."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import replace

import httpx
import pytest

from tests.server.conftest import API_KEY, Running, punica_serve, serve_flags

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def fair_server(checkpoint: Running) -> Iterator[Running]:
    with punica_serve(*serve_flags(checkpoint), "--max-num-seqs", "2",
                      "--scheduling-policy", "fair", "--tenant-from", "user") as url:
        yield replace(checkpoint, url=url)


A_REQUESTS, B_REQUESTS = 32, 3


def body(user: str, k: int, max_tokens: int = 24) -> dict:
    return {"model": "tiny-llama", "prompt": [11 + k, 40, 7, 90], "max_tokens": max_tokens,
            "temperature": 0.0, "ignore_eos": True, "user": user}


async def flood(url: str) -> tuple[list[str], list[dict]]:
    """Tenant a sends A_REQUESTS at once (two run at a time); 0.3 s later b sends B_REQUESTS.
    Returns the tenants of the requests that finished after b's were sent, in finishing order,
    and every answer (a's, then b's)."""
    done: list[tuple[float, str]] = []
    async with httpx.AsyncClient(base_url=url, headers=HEADERS, timeout=120) as client:
        async def one(user: str, k: int) -> dict:
            r = await client.post("/v1/completions", json=body(user, k))
            assert r.status_code == 200, r.text
            done.append((time.perf_counter(), user))
            return r.json()

        a = [asyncio.create_task(one("a", k)) for k in range(A_REQUESTS)]
        await asyncio.sleep(0.3)
        b_sent = time.perf_counter()
        b = [asyncio.create_task(one("b", k)) for k in range(B_REQUESTS)]
        answers = await asyncio.gather(*a, *b)
    return [u for t, u in sorted(done) if t > b_sent], answers


def test_a_flood_does_not_hold_back_another_tenant(fair_server: Running) -> None:
    after, answers = asyncio.run(flood(fair_server.url))
    assert after.count("b") == B_REQUESTS and after.count("a") >= 8, after  # a backlog stood
    assert all(a["usage"]["completion_tokens"] == 24 for a in answers)
    # fcfs would finish b after a's whole backlog; fair alternates once b is queued (the two
    # of a's running then, one more of a's as b's counter starts level with a's)
    last_b = max(i for i, t in enumerate(after) if t == "b")
    assert last_b < 2 * B_REQUESTS + 3, after
    # b's answers are what b's prompts give alone
    with httpx.Client(base_url=fair_server.url, headers=HEADERS, timeout=60) as client:
        for k in range(B_REQUESTS):
            alone = client.post("/v1/completions", json=body("b", k)).json()
            assert alone["choices"][0]["text"] == \
                answers[A_REQUESTS + k]["choices"][0]["text"]
        metrics = client.get("/metrics").text
    # per tenant: every token computed (4 prompt + 24 generated, the last not fed back: 27),
    # time in queue once per request, the fair counter (prompt 1, generated 2 per token)
    assert 'punica_tenant_service_tokens{kind="prompt",tenant="a"} 128.0' in metrics
    assert 'punica_tenant_service_tokens{kind="generated",tenant="a"} 736.0' in metrics
    assert f'punica_tenant_queue_seconds_count{{tenant="a"}} {float(A_REQUESTS)}' in metrics
    assert f'punica_tenant_queue_seconds_count{{tenant="b"}} {float(2 * B_REQUESTS)}' in metrics
    assert 'punica_tenant_fair_counter{tenant="a"} 1600.0' in metrics
    assert 'punica_tenant_requests_waiting{tenant' not in metrics  # nothing left queued


def test_priority_needs_the_priority_policy(fair_server: Running) -> None:
    r = httpx.post(f"{fair_server.url}/v1/completions", headers=HEADERS, timeout=30,
                   json={**body("c", 0), "priority": 3})
    assert r.status_code == 400
    assert "--scheduling-policy priority" in r.json()["error"]["message"]
    ok = httpx.post(f"{fair_server.url}/v1/completions", headers=HEADERS, timeout=30,
                    json={**body("c", 0), "priority": 0})
    assert ok.status_code == 200
