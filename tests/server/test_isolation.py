"""The isolation suite: a real `punica serve` process (and a two-engine `punica cluster` on a
local Ray), unrelated tenants streaming while one tenant does each bad thing. Every unrelated
stream must end with the text it gets alone, every bad request must get its own clear error,
and afterwards nothing may be running, waiting, holding KV blocks or pinning a slot (/metrics;
/cluster/status for the cluster)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.checkpoints import ADAPTERS, save_adapter
from tests.server.conftest import API_KEY, Running, punica_serve

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
UNRELATED = [("tiny-llama", [5, 6, 7, 8]), ("a", [9, 10, 11]), ("b", [12, 13]),
             ("a", [14, 15, 16, 17, 18]), ("tiny-llama", [19, 20])]
"""Other tenants' streams: (model, prompt)."""
BAD_BODIES = [
    {"model": "tiny-llama", "messages": []},
    {"model": "tiny-llama", "messages": [{"role": "user", "content": "x\ud800y"}]},
    {"model": "tiny-llama", "messages": [{"role": "user"}]},
    {"model": "tiny-llama", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
    {"model": "tiny-llama", "prompt": "x", "seed": 2**64},
    {"model": "tiny-llama", "prompt": "x", "max_tokens": 0},
    {"model": "tiny-llama", "prompt": "x", "n": 10_000},
    {"model": "tiny-llama", "prompt": "x", "logprobs": 1000},
    {"model": "tiny-llama", "prompt": "x", "stop": ["s"] * 1000},
    {"model": "tiny-llama", "prompt": "x", "temperature": float("nan")},
    {"model": "tiny-llama", "prompt": "x", "tools": [{"type": "function"}]},
    {"model": "tiny-llama", "prompt": ["x"] * 1000},
    {"model": "tiny-llama", "prompt": [10**30]},
    {"model": "nope", "prompt": "x"},
    {"model": "tiny-llama", "prompt": "x", "top_k": 2**64},  # once failed the whole batch
    {"model": "tiny-llama", "prompt": "x", "max_tokens": "3"},  # types are strict
    {"model": "tiny-llama", "prompt": "x", "n": True},
    {"model": "tiny-llama", "prompt": [True, False]},
    {"model": "tiny-llama", "prompt": "x", "stream_options": {"include_usage": True}},
    {"model": "tiny-\udcff", "prompt": "x"},
    {"model": "tiny-llama", "prompt": "x", "stop_token_ids": [10**6]},
    {"model": "tiny-llama", "prompt": "x " * 200_000},  # cannot fit: refused untokenised
    {"model": "tiny-llama", "messages": [{"role": "assistant", "content": "x",
                                          "tool_calls": [{"id": "1"}]}]},
]


@pytest.fixture(scope="module", params=["serve", "cluster"])
def tenants(request: pytest.FixtureRequest, checkpoint: Running,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    cluster = request.param == "cluster"
    if cluster:
        pytest.importorskip("ray")
    root = tmp_path_factory.mktemp("tenants")
    loras = root / "loras"
    for i, name in enumerate(("a", "b", "t")):
        save_adapter(checkpoint.model_dir, loras / name, 10 + i, **ADAPTERS["qv8"])
    bomb = Path(shutil.copytree(loras / "t", loras / "bomb"))
    st = bomb / "adapter_model.safetensors"
    save_file({k: torch.full_like(v, 1e30) for k, v in load_file(str(st)).items()}, str(st))
    with punica_serve("--model", str(checkpoint.model_dir), "--device", "cpu", "--dtype",
                      "float32", "--max-model-len", "64", "--api-key", API_KEY, "--lora-root",
                      str(loras), "--lora-modules", f"a={loras / 'a'}", f"b={loras / 'b'}",
                      "--max-loras", "2", "--max-lora-rank", "16", "--max-in-flight", "64",
                      "--max-n", "4", "--max-request-bytes", str(1 << 20),
                      *(("--num-engines", "2", "--cpus-per-engine", "1") if cluster else ()),
                      command=request.param, wait_s=240 if cluster else 120) as url:
        yield Running(url, checkpoint.model_dir, {}, loras, cluster)


async def stream_text(client: httpx.AsyncClient, model: str, prompt: list[int],
                      max_tokens: int = 40) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "ignore_eos": True}
    text = []
    async with client.stream("POST", "/v1/completions", json=body, headers=HEADERS) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                assert "error" not in event, event
                text.append(event["choices"][0]["text"])
    return "".join(text)


@pytest.fixture(scope="module")
def alone(tenants: Running) -> list[str]:
    async def main() -> list[str]:
        async with httpx.AsyncClient(base_url=tenants.url, timeout=60) as client:
            return [await stream_text(client, m, p) for m, p in UNRELATED]
    return asyncio.run(main())


def assert_error(r: httpx.Response, status: int | tuple[int, ...]) -> dict:
    assert r.status_code in (status if isinstance(status, tuple) else (status,)), r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return err


def assert_idle(url: str, cluster: bool) -> None:
    if cluster:  # no /metrics there: the frontend's status
        deadline, status = time.time() + 15, {}
        while time.time() < deadline:
            status = httpx.get(f"{url}/cluster/status", headers=HEADERS).json()
            if status["in_flight"] == status["queued"] == 0 and all(
                    e["running"] == 0 and e["idle"] for e in status["engines"]):
                return
            time.sleep(0.2)
        raise AssertionError(f"cluster not idle after the case: {status}")
    deadline, text = time.time() + 15, ""
    names = ("punica_requests_running", "punica_requests_waiting", "punica_kv_blocks_used",
             "punica_adapter_slots_pinned")
    while time.time() < deadline:
        text = httpx.get(f"{url}/metrics", headers=HEADERS).text
        values = {n: float(line.split()[-1]) for line in text.splitlines()
                  for n in names if line.startswith(n + " ")}
        if values == dict.fromkeys(names, 0.0):
            return
        time.sleep(0.2)
    raise AssertionError(f"engine not idle after the case:\n{text}")


BadAction = Callable[[httpx.AsyncClient], Awaitable[None]]


async def unload_with_queued(client: httpx.AsyncClient) -> None:
    """t's requests queue (both slots are pinned by a and b); t is unloaded meanwhile."""
    r = await client.post("/v1/load_lora_adapter", headers=HEADERS,
                          json={"lora_name": "t", "lora_path": "t"})
    assert r.status_code == 200, r.text
    reqs = [asyncio.create_task(client.post("/v1/completions", headers=HEADERS, json={
        "model": "t", "prompt": [1, 2, 3], "max_tokens": 30, "ignore_eos": True}))
        for _ in range(3)]
    await asyncio.sleep(0.05)
    r = await client.post("/v1/unload_lora_adapter", headers=HEADERS, json={"lora_name": "t"})
    assert r.status_code == 200, r.text
    failed = 0
    for done in await asyncio.gather(*reqs):  # each finished before the unload, or failed
        if done.status_code != 200:
            assert "unloaded" in assert_error(done, 404)["message"]
            failed += 1
    assert r.json()["failed_requests"] == failed


async def overflowing_adapter(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/load_lora_adapter", headers=HEADERS,
                          json={"lora_name": "bomb", "lora_path": "bomb", "replace": True})
    assert r.status_code == 200, r.text
    r = await client.post("/v1/completions", headers=HEADERS, json={
        "model": "bomb", "prompt": [1, 2, 3], "max_tokens": 5})
    assert "not finite" in assert_error(r, 422)["message"]


async def bad_inputs(client: httpx.AsyncClient) -> None:
    for body in BAD_BODIES:
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        r = await client.post(path, headers={**HEADERS, "Content-Type": "application/json"},
                              content=json.dumps(body).encode())
        assert r.status_code in (400, 404), (body, r.text)
        assert_error(r, r.status_code)


async def leaving_clients(client: httpx.AsyncClient) -> None:
    """Non-streaming clients (n = 4) that give up at once: their sequences must stop."""
    async def impatient() -> None:
        with pytest.raises(httpx.TimeoutException):
            await client.post("/v1/completions", headers=HEADERS, timeout=0.05, json={
                "model": "b", "prompt": [3, 4], "max_tokens": 55, "n": 4, "ignore_eos": True})

    before = await aborted(client)
    await asyncio.gather(*(impatient() for _ in range(8)))
    if before is None:
        return  # a cluster keeps no abort counts: assert_idle checks that nothing is left
    deadline = time.time() + 10
    while await aborted(client) < before + 8:  # each left request was aborted, not finished
        assert time.time() < deadline, "requests of clients that left were not aborted"
        await asyncio.sleep(0.1)


async def aborted(client: httpx.AsyncClient) -> float | None:
    r = await client.get("/metrics", headers=HEADERS)
    if r.status_code == 404:
        return None
    text = r.text
    line = 'punica_requests_total{adapter="b",reason="abort"} '
    return sum(float(x[len(line):]) for x in text.splitlines() if x.startswith(line))


async def huge_body(client: httpx.AsyncClient) -> None:
    body = json.dumps({"model": "tiny-llama", "prompt": "x " * (1 << 20)}).encode()
    r = await client.post("/v1/completions", headers=HEADERS, content=body)
    assert_error(r, 413)

    async def chunked() -> object:  # no Content-Length: counted as it arrives
        for _ in range(40):
            yield b"x" * 65536
    r = await client.post("/v1/completions", headers=HEADERS, content=chunked())
    assert_error(r, 413)
    r = await client.post("/v1/completions", content=b"{}" * 100)  # no key: 401 (the body
    assert_error(r, 401)                                           # is not parsed)
    r = await client.post("/v1/completions", headers={**HEADERS, "Content-Encoding": "gzip"},
                          content=b"{}")
    assert_error(r, 415)


BAD_ADAPTERS = ("not-object", "bad-regex", "zero-d", "symlink-out", "fifo", "redos",
                "rank-mismatch", "dup-key")


async def bad_adapter_dirs(client: httpx.AsyncClient) -> None:
    for name in BAD_ADAPTERS:
        r = await client.post("/v1/load_lora_adapter", headers=HEADERS,
                              json={"lora_name": name, "lora_path": f"bad/{name}"})
        assert_error(r, 400)


def make_bad_adapters(root: Path, good: Path) -> None:
    bad = root / "bad"
    for name in BAD_ADAPTERS:
        shutil.copytree(good, bad / name, dirs_exist_ok=True)
    (bad / "not-object" / "adapter_config.json").write_text("[1, 2]")
    cfg = json.loads((good / "adapter_config.json").read_text())
    (bad / "bad-regex" / "adapter_config.json").write_text(json.dumps(
        cfg | {"alpha_pattern": {"(unclosed": 4}}))
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight":
               torch.tensor(1.0)}, str(bad / "zero-d" / "adapter_model.safetensors"))
    outside = root.parent / "outside.safetensors"
    shutil.copy(good / "adapter_model.safetensors", outside)
    (bad / "symlink-out" / "adapter_model.safetensors").unlink()
    (bad / "symlink-out" / "adapter_model.safetensors").symlink_to(outside)
    (bad / "fifo" / "adapter_config.json").unlink()
    os.mkfifo(bad / "fifo" / "adapter_config.json")
    # matched on the engine thread, this once froze the server for hours
    (bad / "redos" / "adapter_config.json").write_text(json.dumps(
        cfg | {"alpha_pattern": {"(.|.)*!": 8}}))
    (bad / "rank-mismatch" / "adapter_config.json").write_text(json.dumps(cfg | {"r": 4}))
    tensors = load_file(str(good / "adapter_model.safetensors"))
    key = next(k for k in tensors if "lora_A" in k)
    save_file(tensors | {key.replace(".weight", ".default.weight"): tensors[key].clone()},
              str(bad / "dup-key" / "adapter_model.safetensors"))


CASES: dict[str, BadAction] = {
    "unload-with-queued": unload_with_queued, "overflowing-adapter": overflowing_adapter,
    "bad-inputs": bad_inputs, "leaving-clients": leaving_clients, "huge-body": huge_body,
    "bad-adapter-files": bad_adapter_dirs,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_unrelated_streams_finish_as_alone(tenants: Running, alone: list[str],
                                           case: str) -> None:
    if case == "bad-adapter-files" and not (tenants.lora_root / "bad").exists():
        make_bad_adapters(tenants.lora_root, tenants.lora_root / "a")

    async def main() -> list[str]:
        async with httpx.AsyncClient(base_url=tenants.url, timeout=60) as client:
            streams = [asyncio.create_task(stream_text(client, m, p)) for m, p in UNRELATED]
            await asyncio.sleep(0.01)
            await CASES[case](client)
            return await asyncio.gather(*streams)

    assert asyncio.run(main()) == alone
    assert httpx.get(f"{tenants.url}/health").status_code == 200
    assert_idle(tenants.url, tenants.cluster)
