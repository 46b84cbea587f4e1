"""The server through the official openai client, and raw HTTP for the error cases: each test
against `punica serve` and against `punica cluster` (two engines on Ray, same API)."""

from __future__ import annotations

import httpx
import openai
import pytest

from punica import LLM, SamplingParams
from punica.engine.outputs import RequestOutput
from tests.server.conftest import API_KEY, Running


@pytest.fixture(scope="module", params=["serve", "cluster"])
def server(request: pytest.FixtureRequest) -> Running:
    return request.getfixturevalue(f"{request.param}_server")


PROMPT = "The quick brown fox"
MIXED = [([3 + i, 7, 11 + i], "qv8" if i % 2 else None) for i in range(8)]


@pytest.fixture(scope="module")
def offline(checkpoint: Running) -> LLM:
    """The offline API on the same model and adapter (Triton's interpreter: slow)."""
    llm = LLM(str(checkpoint.model_dir), dtype="float32", device="cpu", max_model_len=64)
    llm.load_lora("qv8", str(checkpoint.adapters["qv8"]))
    return llm


@pytest.fixture(scope="module")
def mixed_want(offline: LLM) -> list[str]:
    """Offline texts of the MIXED cases, computed once for both servers."""
    return [o.text for o in offline.generate([p for p, _ in MIXED],
                                             SamplingParams(max_tokens=6, temperature=0.0),
                                             lora=[a for _, a in MIXED], use_tqdm=False)]


@pytest.fixture(scope="module")
def client(server: Running) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def test_models_lists_base_and_adapters(client: openai.OpenAI) -> None:
    ids = {m.id: m for m in client.models.list().data}
    assert set(ids) == {"tiny-llama", "qv8"}


@pytest.fixture(scope="module")
def fox_want(offline: LLM) -> dict[str, RequestOutput]:
    """Offline greedy completions of PROMPT per served model, computed once."""
    return {model: offline.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0.0),
                                    lora=lora, use_tqdm=False)[0]
            for model, lora in (("tiny-llama", None), ("qv8", "qv8"))}


def test_completions_equal_the_offline_api(fox_want: dict[str, RequestOutput],
                                           client: openai.OpenAI) -> None:
    for model, want in fox_want.items():
        got = client.completions.create(model=model, prompt=PROMPT, max_tokens=8,
                                        temperature=0.0)
        assert got.choices[0].text == want.text
        assert got.choices[0].finish_reason == want.finish_reason
        assert got.usage.completion_tokens == len(want.token_ids)


def test_streaming_with_usage_and_n(client: openai.OpenAI) -> None:
    full = client.completions.create(model="qv8", prompt="café 東京", max_tokens=6,
                                     temperature=0.0)
    chunks = list(client.completions.create(model="qv8", prompt="café 東京", max_tokens=6,
                                            temperature=0.0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    # One chunk per generated token (clients time tokens by chunks), then the usage chunk.
    assert sum(1 for c in chunks if c.choices) == 6
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    multi = client.completions.create(model="tiny-llama", prompt=[1, 2, 3], max_tokens=4, n=3,
                                      seed=7, temperature=1.0)
    assert sorted(c.index for c in multi.choices) == [0, 1, 2]
    again = client.completions.create(model="tiny-llama", prompt=[1, 2, 3], max_tokens=4, n=3,
                                      seed=7, temperature=1.0)
    assert [c.text for c in again.choices] == [c.text for c in multi.choices]


def test_chat_plain_and_streamed(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "hello there"}]
    full = client.chat.completions.create(model="qv8", messages=messages, max_tokens=5,
                                          temperature=0.0, logprobs=True, top_logprobs=2)
    choice = full.choices[0]
    assert choice.message.role == "assistant" and full.usage.completion_tokens == 5
    assert len(choice.logprobs.content) == 5
    stream = client.chat.completions.create(model="qv8", messages=messages, max_tokens=5,
                                            temperature=0.0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == choice.message.content


def test_load_use_unload_adapter(server: Running, client: openai.OpenAI) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(f"{server.url}/v1/load_lora_adapter", headers=headers,
                   json={"lora_name": "rs", "lora_path": "all4rs"})
    assert r.status_code == 200, r.text
    out = client.completions.create(model="rs", prompt=[5, 6], max_tokens=3, temperature=0.0)
    assert out.usage.completion_tokens == 3
    r = httpx.post(f"{server.url}/v1/unload_lora_adapter", headers=headers,
                   json={"lora_name": "rs"})
    assert r.status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="rs", prompt=[5, 6], max_tokens=3)


@pytest.mark.parametrize("body,status,needle", [
    ({"model": "nope", "prompt": "x"}, 404, "does not exist"),
    ({"model": "tiny-llama", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "tiny-llama", "prompt": [1] * 60, "max_tokens": 10}, 400,
     "maximum context length is 64 tokens"),
    ({"model": "tiny-llama"}, 400, "prompt"),
    ({"model": "tiny-llama", "prompt": []}, 400, "non-empty"),
])
def test_bad_requests(server: Running, body: dict, status: int, needle: str) -> None:
    r = httpx.post(f"{server.url}/v1/completions", json=body,
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == status and needle in r.json()["error"]["message"], r.text


def test_auth_json_and_paths(server: Running) -> None:
    assert httpx.post(f"{server.url}/v1/completions", json={}).status_code == 401
    bad = httpx.post(f"{server.url}/v1/completions", content=b"{not json",
                     headers={"Authorization": f"Bearer {API_KEY}",
                              "Content-Type": "application/json"})
    assert bad.status_code == 400
    escape = httpx.post(f"{server.url}/v1/load_lora_adapter",
                        headers={"Authorization": f"Bearer {API_KEY}"},
                        json={"lora_name": "x", "lora_path": "../../etc"})
    assert escape.status_code == 400 and "below the lora root" in escape.text
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/version").json()["version"]
    for path in ("/docs", "/openapi.json", "/metrics", "/v1/models"):  # behind the key
        r = httpx.get(f"{server.url}{path}")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_concurrent_mixed_adapters_equal_offline(server: Running, mixed_want: list[str]
                                                  ) -> None:
    import asyncio

    cases, want = MIXED, mixed_want

    async def main() -> list[str]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            async def ask(prompt: list[int], adapter: str | None) -> str:
                r = await client.post("/v1/completions", headers={
                    "Authorization": f"Bearer {API_KEY}"}, json={
                    "model": adapter or "tiny-llama", "prompt": prompt, "max_tokens": 6,
                    "temperature": 0.0})
                return r.json()["choices"][0]["text"]
            return await asyncio.gather(*(ask(p, a) for p, a in cases))

    assert asyncio.run(main()) == want


def test_unload_in_use_fails_only_its_request(server: Running, client: openai.OpenAI) -> None:
    """Unloading an adapter fails its own in-flight requests (with a 404 error event in the
    stream) and touches no one else; loading it again needs no restart."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    stream = client.completions.create(model="qv8", prompt=[1, 2, 3], max_tokens=40,
                                       temperature=0.0, stream=True,
                                       extra_body={"ignore_eos": True})
    first = next(iter(stream))
    assert first.choices
    r = httpx.post(f"{server.url}/v1/unload_lora_adapter", headers=headers,
                   json={"lora_name": "qv8"})
    assert r.status_code == 200
    with pytest.raises(openai.APIError, match="unloaded while this request was in flight"):
        list(stream)
    r = httpx.post(f"{server.url}/v1/load_lora_adapter", headers=headers,
                   json={"lora_name": "qv8", "lora_path": "qv8"})
    assert r.status_code == 200, r.text


def test_stop_strings(client: openai.OpenAI) -> None:
    full = client.completions.create(model="tiny-llama", prompt="The quick brown", max_tokens=12,
                                     temperature=0.0, extra_body={"ignore_eos": True})
    text = full.choices[0].text
    stop = text[3:5] if len(text) >= 5 and text[3:5].strip() else None
    if stop is None:
        pytest.skip("no usable stop string in this greedy text")
    cut = client.completions.create(model="tiny-llama", prompt="The quick brown", max_tokens=12,
                                    temperature=0.0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.find(stop)]
