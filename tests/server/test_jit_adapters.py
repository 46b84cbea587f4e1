"""`punica serve --lora-root DIR` and `punica cluster`: a request naming an adapter folder below
the root (nested names allowed) loads it on first use; a folder that fails to load fails only its
request, with the reason; /v1/models lists what is loaded."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from punica import LLM, SamplingParams
from tests.checkpoints import ADAPTERS, save_adapter
from tests.server.conftest import API_KEY, Running, punica_serve, serve_flags

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def models(url: str) -> set[str]:
    return {m["id"] for m in httpx.get(f"{url}/v1/models", headers=HEADERS).json()["data"]}


@pytest.fixture(scope="module", params=["serve", "cluster"])
def jit_server(request: pytest.FixtureRequest, checkpoint: Running,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Running, str]]:
    """A server of its own (`punica serve`, or a two-engine CPU `punica cluster`): the folders
    this test adds below its root must not show in the other modules' /v1/models."""
    c = replace(checkpoint, lora_root=Path(tmp_path_factory.mktemp("jit-root")))
    if request.param == "serve":
        with punica_serve(*serve_flags(c)) as url:
            yield replace(c, url=url), "serve"
        return
    pytest.importorskip("ray")
    with punica_serve(*serve_flags(c), "--num-engines", "2", "--cpus-per-engine", "1",
                      command="cluster", wait_s=240) as url:
        yield replace(c, url=url), "cluster"


def test_first_use_loads_a_folder_below_the_root(jit_server: tuple[Running, str]) -> None:
    serve_server, kind = jit_server
    cluster = kind == "cluster"
    root = serve_server.lora_root
    save_adapter(serve_server.model_dir, root / "team" / "jit", 7, **ADAPTERS["mlp16"])
    bad = save_adapter(serve_server.model_dir, root / "team" / "broken", 8, **ADAPTERS["qv8"])
    (bad / "adapter_config.json").write_text("{not json")
    assert "team/jit" not in models(serve_server.url)

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=serve_server.url, timeout=60) as client:
            bodies = [{"model": m, "prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0.0,
                       "ignore_eos": True}
                      for m in ["team/jit"] * 4 + ["team/broken", "tiny-llama", "qv8"]]
            return await asyncio.gather(*(client.post("/v1/completions", json=b,
                                                      headers=HEADERS) for b in bodies))

    answers = asyncio.run(main())
    texts = [r.json()["choices"][0]["text"] for r in answers[:4]]
    assert all(r.status_code == 200 for r in answers[:4]) and len(set(texts)) == 1
    broken = answers[4]
    message = broken.json()["error"]["message"]
    assert broken.status_code == 400 and "team/broken" in message, broken.text
    assert "adapter_config.json" in message and str(root.resolve()) not in message
    assert [r.status_code for r in answers[5:]] == [200, 200]
    for model, answer in zip(("tiny-llama", "qv8"), answers[5:], strict=True):  # as alone
        alone = httpx.post(f"{serve_server.url}/v1/completions", headers=HEADERS, timeout=60,
                           json={"model": model, "prompt": [5, 6, 7], "max_tokens": 4,
                                 "temperature": 0.0, "ignore_eos": True})
        assert alone.json()["choices"][0]["text"] == answer.json()["choices"][0]["text"]
    for name in ("team/../qv8", "/etc", "team/missing"):
        r = httpx.post(f"{serve_server.url}/v1/completions", headers=HEADERS,
                       json={"model": name, "prompt": [5], "max_tokens": 1})
        assert r.status_code == 404, (name, r.text)
    if cluster:  # each engine reads the folder when it first gets one of its requests; the
        return   # cluster lists adapters every engine holds and has no /metrics
    metrics = httpx.get(f"{serve_server.url}/metrics", headers=HEADERS).text
    reads = re.search(r"^punica_adapter_disk_loads ([0-9.]+)$", metrics, re.M)
    failures = re.search(r"^punica_adapter_load_failures ([0-9.]+)$", metrics, re.M)
    assert reads and float(reads[1]) >= 1 and failures and float(failures[1]) >= 1, metrics
    listed = models(serve_server.url)
    assert "team/jit" in listed and "team/broken" not in listed
    # the offline API: the same folder by name, the same tokens
    llm = LLM(str(serve_server.model_dir), dtype="float32", device="cpu", max_model_len=64,
              max_loras=2, max_lora_rank=16, lora_root=str(root))
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0.0,
                                                   ignore_eos=True), lora="team/jit",
                       use_tqdm=False)
    assert out[0].text == texts[0]
