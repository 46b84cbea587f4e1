"""Property-based fuzzing (Hypothesis) of a real `punica serve`: request bodies, and adapter
directories (configs and tensors). Whatever comes in, the answer is never a 5xx, every error has
OpenAI's shape, a 200 is a well-formed answer, and the server serves a known request correctly
after each case."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from tests.checkpoints import ADAPTERS, save_adapter
from tests.server.conftest import API_KEY, Running, punica_serve

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

texts = st.text(max_size=40) | st.sampled_from(["\ud800", "a\x00b", "", " ", "é" * 30])
numbers = (st.integers(-3, 70) | st.integers(-(2**70), 2**70) |
           st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0, 1, 2, 0.5]))
scalars = st.none() | st.booleans() | numbers | texts
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) |
                      st.dictionaries(texts, inner, max_size=3), max_leaves=8)
token_lists = st.lists(st.integers(-5, 400), min_size=0, max_size=8)
FIELDS = {
    "max_tokens": st.integers(-2, 80) | values, "n": st.integers(-1, 6) | values,
    "temperature": numbers | values, "top_p": numbers, "top_k": st.integers(-3, 500),
    "min_p": numbers, "seed": numbers | values, "stop": texts | st.lists(texts, max_size=20),
    "presence_penalty": numbers, "frequency_penalty": numbers,
    "repetition_penalty": numbers, "stream": st.booleans() | values,
    "logprobs": st.integers(-2, 30) | st.booleans() | values,
    "top_logprobs": st.integers(-2, 30) | values, "ignore_eos": st.booleans(),
    "stop_token_ids": st.lists(st.integers(-3, 500), max_size=4) | values,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | values,
    "user": texts, "logit_bias": st.none() | values, "response_format": st.none() | values,
    "max_completion_tokens": st.integers(-1, 60) | values,
}
models = st.sampled_from(["tiny-llama", "qv8", "nope", "", 5, None])
messages = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "x", 3]),
     "content": texts | st.none() | st.lists(st.fixed_dictionaries(
         {"type": st.sampled_from(["text", "image_url", 1]), "text": texts}), max_size=3)}),
    max_size=3) | values
prompts = texts | token_lists | st.lists(texts, max_size=3) | st.lists(token_lists, max_size=3) \
    | values


VALID = {  # in range: these bodies mostly get 200, so the answers' shapes are fuzzed too
    "max_tokens": st.integers(1, 20), "n": st.integers(1, 4), "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1), "top_k": st.integers(-1, 50), "min_p": st.floats(0, 1),
    "seed": st.integers(0, 2**40), "stop": texts.filter(bool) | st.lists(
        texts.filter(lambda t: bool(t) and "\ud800" not in t), max_size=3),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2), "stream": st.booleans(),
    "logprobs": st.integers(0, 5), "top_logprobs": st.integers(0, 5),
    "ignore_eos": st.booleans(), "stop_token_ids": st.lists(st.integers(0, 383), max_size=3),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
}


@st.composite
def bodies(draw: st.DrawFn) -> tuple[str, dict]:
    chat, valid = draw(st.booleans()), draw(st.booleans())
    if valid:
        body = {"model": draw(st.sampled_from(["tiny-llama", "qv8"]))}
        body["messages" if chat else "prompt"] = draw(
            st.just([{"role": "user", "content": draw(st.text(min_size=1, max_size=20))}])
            if chat else st.lists(st.integers(0, 383), min_size=1, max_size=8))
        fields = VALID
    else:
        body = {"model": draw(models)}
        body["messages" if chat else "prompt"] = draw(messages if chat else prompts)
        fields = FIELDS
    for key in draw(st.lists(st.sampled_from(sorted(fields)), max_size=5, unique=True)):
        body[key] = draw(fields[key])
    if chat and valid and "logprobs" in body:
        body["logprobs"] = True  # chat's logprobs is a flag (top_logprobs the count)
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


@pytest.fixture(scope="module")
def fuzz_server(checkpoint: Running) -> Iterator[Running]:
    with punica_serve("--model", str(checkpoint.model_dir), "--device", "cpu", "--dtype",
                      "float32", "--max-model-len", "64", "--api-key", API_KEY,
                      "--lora-modules", f"qv8={checkpoint.adapters['qv8']}", "--lora-root",
                      str(checkpoint.lora_root), "--max-loras", "2", "--max-lora-rank", "16",
                      "--max-n", "4") as url:
        yield Running(url, checkpoint.model_dir, checkpoint.adapters, checkpoint.lora_root)


def check_answer(r: httpx.Response, stream: bool) -> None:
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == r.status_code
        return
    if not stream:
        assert r.json()["choices"], r.text
        return
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", r.text
    for chunk in events[:-1]:
        body = json.loads(chunk)
        assert "error" not in body or body["error"]["code"] < 500, chunk


def assert_healthy(url: str) -> None:
    r = httpx.post(f"{url}/v1/completions", headers=HEADERS, timeout=30, json={
        "model": "qv8", "prompt": [1, 2, 3], "max_tokens": 3, "temperature": 0.0,
        "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text


@FUZZ
@given(case=bodies())
def test_request_bodies_never_get_5xx(fuzz_server: Running, case: tuple[str, dict]) -> None:
    path, body = case
    raw = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    r = httpx.post(f"{fuzz_server.url}{path}", content=raw, timeout=60,
                   headers={**HEADERS, "Content-Type": "application/json"})
    event(f"status {r.status_code}")
    check_answer(r, body.get("stream") is True)
    assert_healthy(fuzz_server.url)


tensor_shapes = st.lists(st.integers(0, 70), min_size=0, max_size=3)
dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.int32])
fills = st.sampled_from([0.01, 1e30, float("nan"), float("inf"), -1.0])
configs = st.fixed_dictionaries({}, optional={
    "r": st.integers(-1, 40) | values, "lora_alpha": numbers | values,
    "use_rslora": st.booleans() | values, "peft_type": st.sampled_from(["LORA", "IA3"]) | values,
    "alpha_pattern": st.dictionaries(st.sampled_from(["q_proj", "(", "[a-", ".*", "v"]),
                                     numbers | values, max_size=2) | values,
    "bias": st.sampled_from(["none", "all"]) | values, "use_dora": st.booleans() | values,
    "modules_to_save": st.none() | values})
KEYS = ["base_model.model.model.layers.{l}.self_attn.{p}_proj.lora_{h}.weight",
        "base_model.model.model.layers.{l}.mlp.{p}_proj.lora_{h}.weight", "lm_head.weight"]


@st.composite
def adapter_files(draw: st.DrawFn) -> tuple[object, dict[str, torch.Tensor]]:
    if draw(st.booleans()):  # a real adapter's layout, its numbers and config fields fuzzed
        rank = draw(st.integers(1, 20))
        cfg = {"r": rank, "lora_alpha": draw(numbers), "peft_type": "LORA"}
        cfg.update(draw(configs.map(lambda c: {k: v for k, v in c.items() if k != "r"})))
        fill, dtype = draw(fills), draw(dtypes.filter(lambda d: d.is_floating_point))
        key = KEYS[0].format(l=draw(st.integers(0, 1)), p="q", h="{h}")
        return cfg, {key.format(h="A"): torch.full((rank, 64), fill).to(dtype),
                     key.format(h="B"): torch.full((64, rank), fill).to(dtype)}
    cfg = draw(configs | values)
    tensors = {}
    for _ in range(draw(st.integers(0, 4))):
        key = draw(st.sampled_from(KEYS)).format(
            l=draw(st.integers(0, 3)), p=draw(st.sampled_from(["q", "v", "gate", "x"])),
            h=draw(st.sampled_from(["A", "B"])))
        shape = draw(tensor_shapes)
        tensors[key] = torch.full(shape, draw(fills)).to(draw(dtypes))
    return cfg, tensors


@FUZZ
@given(files=adapter_files())
def test_adapter_files_never_get_5xx(fuzz_server: Running,
                                     files: tuple[object, dict[str, torch.Tensor]]) -> None:
    cfg, tensors = files
    folder = Path(fuzz_server.lora_root) / "fuzzed"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(cfg, allow_nan=True,
                                                           ensure_ascii=False), "utf-8",
                                                "surrogatepass")
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    url = fuzz_server.url
    r = httpx.post(f"{url}/v1/load_lora_adapter", headers=HEADERS, timeout=30,
                   json={"lora_name": "fuzzed", "lora_path": "fuzzed", "replace": True})
    event(f"load status {r.status_code}")
    check_answer(r, stream=False) if r.status_code != 200 else None
    if r.status_code == 200:
        used = httpx.post(f"{url}/v1/completions", headers=HEADERS, timeout=30, json={
            "model": "fuzzed", "prompt": [1, 2], "max_tokens": 2})
        assert used.status_code in (200, 422), used.text
        gone = httpx.post(f"{url}/v1/unload_lora_adapter", headers=HEADERS,
                          json={"lora_name": "fuzzed"})
        assert gone.status_code == 200, gone.text
    assert_healthy(url)


def test_a_valid_fuzzed_adapter_is_served(fuzz_server: Running, tmp_path: Path) -> None:
    """The fuzzer's loop can succeed: a real adapter written where it writes loads and runs."""
    folder = Path(fuzz_server.lora_root) / "fuzzed-ok"
    save_adapter(fuzz_server.model_dir, folder, 7, **ADAPTERS["qv8"])
    r = httpx.post(f"{fuzz_server.url}/v1/load_lora_adapter", headers=HEADERS, timeout=30,
                   json={"lora_name": "fuzzed-ok", "lora_path": "fuzzed-ok"})
    assert r.status_code == 200, r.text
    assert_healthy(fuzz_server.url)
