"""Per-tenant limits: the token window exactly (a test clock), then both limits through the
server: 429 with Retry-After for the tenant past its limit, nothing for the others."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace

import httpx
import pytest

from punica.errors import RateLimitedError, RequestTooLargeError
from punica.server.tenant_limits import TokenWindows
from tests.server.conftest import API_KEY, Running, punica_serve, serve_flags

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def test_token_window_slides_and_says_when_to_retry() -> None:
    now = [100.0]
    w = TokenWindows(100, clock=lambda: now[0])
    w.charge("a", 60)
    now[0] = 130.0
    w.charge("a", 30)
    w.charge("b", 100)  # tenants do not share a window
    with pytest.raises(RateLimitedError) as err:
        w.charge("a", 20)  # 90 + 20 > 100: the charge of t=100 must leave (at t=160)
    assert err.value.retry_after_s == 30 and err.value.status == 429
    assert w.used("a") == 90
    now[0] = 159.5
    with pytest.raises(RateLimitedError) as err:
        w.charge("a", 20)
    assert err.value.retry_after_s == 1
    now[0] = 160.0
    w.charge("a", 20)
    assert w.used("a") == 50
    with pytest.raises(RequestTooLargeError):
        w.charge("c", 101)  # could never pass
    now[0] = 500.0
    assert w.used("a") == 0 and w.used("b") == 0
    assert w._charges == {} and w._sums == {}  # idle tenants forgotten


@pytest.fixture(scope="module")
def limited(checkpoint: Running) -> Iterator[Running]:
    with punica_serve(*serve_flags(checkpoint), "--max-num-seqs", "2", "--tenant-from", "user",
                      "--tenant-max-in-flight", "2", "--tenant-tokens-per-minute",
                      "120") as url:
        yield replace(checkpoint, url=url)


def body(user: str, max_tokens: int = 8) -> dict:
    return {"model": "tiny-llama", "prompt": [5, 6, 7, 8], "max_tokens": max_tokens,
            "temperature": 0.0, "ignore_eos": True, "user": user}


def test_in_flight_limit_answers_429_for_that_tenant_only(limited: Running) -> None:
    async def go() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=limited.url, headers=HEADERS,
                                     timeout=60) as client:
            jobs = [client.post("/v1/completions", json=body("flood", 56)) for _ in range(4)]
            jobs += [client.post("/v1/completions", json=body("calm", 8))]
            return await asyncio.gather(*jobs)

    *flood, calm = asyncio.run(go())
    codes = sorted(r.status_code for r in flood)
    assert codes == [200, 200, 429, 429], codes
    refused = next(r for r in flood if r.status_code == 429)
    assert refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert "in flight" in refused.json()["error"]["message"]
    assert calm.status_code == 200 and calm.json()["usage"]["completion_tokens"] == 8
    alone = httpx.post(f"{limited.url}/v1/completions", headers=HEADERS, timeout=60,
                       json=body("calm", 8))
    assert alone.json()["choices"][0]["text"] == calm.json()["choices"][0]["text"]
    texts = {r.json()["choices"][0]["text"] for r in flood if r.status_code == 200}
    assert len(texts) == 1  # the admitted flood requests (one prompt) answer alike


def test_tokens_per_minute_answers_429_with_retry_after(limited: Running) -> None:
    with httpx.Client(base_url=limited.url, headers=HEADERS, timeout=60) as client:
        ok = [client.post("/v1/completions", json=body("tpm", 26)) for _ in range(4)]
        assert [r.status_code for r in ok] == [200] * 4  # 4 x (4 + 26) = 120 tokens
        over = client.post("/v1/completions", json=body("tpm", 8))
        assert over.status_code == 429 and 1 <= int(over.headers["Retry-After"]) <= 60
        assert "tokens per minute" in over.json()["error"]["message"]
        other = client.post("/v1/completions", json=body("someone else", 8))
        assert other.status_code == 200
        huge = client.post("/v1/completions", json={**body("tpm2", 58), "n": 2})
        assert huge.status_code == 400  # 2 x (4 + 58) = 124: more than a whole minute's
        assert "tokens per minute" in huge.json()["error"]["message"]


def test_refunds_and_sweeps_keep_the_windows_exact() -> None:
    from punica.server import tenant_limits

    now = [0.0]
    w = TokenWindows(100, clock=lambda: now[0])
    w.charge("a", 40)
    w.charge("a", 30)
    w.refund("a", 30)  # the request was then refused
    assert w.used("a") == 40
    w.refund("a", 40)
    assert w._charges == {} and w._sums == {}
    for k in range(tenant_limits.SWEEP_EVERY - 3):  # one-off tenants (2 charges of a before)
        w.charge(f"u{k}", 1)
    now[0] = 61.0
    w.charge("last", 1)  # the sweep: every expired window goes, not only the charged one's
    assert list(w._charges) == ["last"] and list(w._sums) == ["last"]
