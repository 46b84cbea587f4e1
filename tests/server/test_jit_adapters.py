"""`punica serve --lora-root DIR` and `punica cluster`: a request naming an adapter folder below
the root (nested names allowed) loads it on first use; a folder that fails to load fails only its
request, with the reason; /v1/models lists what is loaded; /v1/lora_adapters lists the folders
below the root."""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from punica import LLM, SamplingParams
from punica.config import EngineConfig, ModelConfig
from punica.engine.async_engine import AsyncEngine
from punica.engine.llm_engine import LLMEngine
from punica.server.app import create_app
from punica.server.lora_listing import RootListing, scan_root
from punica.server.state import ServerSettings
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
    for tier in ("disk", "host"):  # each read and each slot fill is in the load histogram
        count = re.search(rf'^punica_adapter_load_seconds_count{{tier="{tier}"}} ([0-9.]+)$',
                          metrics, re.M)
        assert count and float(count[1]) >= 1, metrics
    listed = models(serve_server.url)
    assert "team/jit" in listed and "team/broken" not in listed
    # the offline API: the same folder by name, the same tokens
    llm = LLM(str(serve_server.model_dir), dtype="float32", device="cpu", max_model_len=64,
              max_loras=2, max_lora_rank=16, lora_root=str(root))
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0.0,
                                                   ignore_eos=True), lora="team/jit",
                       use_tqdm=False)
    assert out[0].text == texts[0]


def shelf(url: str) -> list[dict]:
    """The listing's entries below shelf/ (other tests add folders to the same root)."""
    r = httpx.get(f"{url}/v1/lora_adapters", headers=HEADERS)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["truncated"] is False
    return [e for e in body["data"] if e["id"].startswith("shelf/")]


def test_the_root_lists_its_adapter_folders(jit_server: tuple[Running, str]) -> None:
    """Folders holding adapter_config.json, nested names up to three parts, a link that stays
    below the root; not a folder without a config, one deeper, or a link out of the root.
    `loaded` turns true once a request used the folder (in the cluster, as /v1/models: once
    every engine holds it, which a first use does not make so)."""
    server, kind = jit_server
    top = server.lora_root / "shelf"
    for name in ("one", "org/two", "a/b/deep"):
        shutil.copytree(server.adapters["qv8"], top / name)
    (top / "notes").mkdir()
    (top / "notes" / "README.md").write_text("no adapter here")
    (top / "out").symlink_to(server.adapters["all4rs"], target_is_directory=True)
    (top / "alias").symlink_to(top / "one", target_is_directory=True)
    names = ["shelf/alias", "shelf/one", "shelf/org/two"]
    assert shelf(server.url) == [{"id": n, "object": "lora_adapter", "loaded": False}
                                 for n in names]
    for name in ("shelf/org/two", "shelf/alias"):  # listed names are usable as `model`
        r = httpx.post(f"{server.url}/v1/completions", headers=HEADERS, timeout=60,
                       json={"model": name, "prompt": [5, 6], "max_tokens": 2})
        assert r.status_code == 200, r.text
    used = kind == "serve"
    assert shelf(server.url) == [{"id": "shelf/alias", "object": "lora_adapter", "loaded": used},
                                 {"id": "shelf/one", "object": "lora_adapter", "loaded": False},
                                 {"id": "shelf/org/two", "object": "lora_adapter",
                                  "loaded": used}]
    assert ("shelf/org/two" in models(server.url)) is used


def test_without_a_root_the_listing_is_a_404(checkpoint: Running) -> None:
    """The same route and answer serve `punica cluster` (its model's jit_root is None too)."""
    engine = AsyncEngine(LLMEngine(EngineConfig(
        ModelConfig(str(checkpoint.model_dir), "float32", "cpu", 64))))

    async def get() -> httpx.Response:
        app = create_app(engine, ServerSettings("tiny-llama"))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://punica") as client:
            return await client.get("/v1/lora_adapters")

    try:
        r = asyncio.run(get())
    finally:
        engine.shutdown()
    assert r.status_code == 404
    assert r.json() == {"error": {
        "message": "no adapter folder to list: start the server with --lora-root DIR",
        "type": "not_found_error", "param": None, "code": 404}}


def test_the_scan_is_bounded(tmp_path: Path) -> None:
    """Names are valid adapter names; a link cycle ends at three parts; links out of the root
    are not entered; MAX_ADAPTERS and MAX_SCANNED stop the scan (breadth first: the shallowest
    names are listed) and say so."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    for folder in (root / "x1", root / "x2", root / "x3", root / "d", root / "has space",
                   outside):
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
    (root / "d" / "up").symlink_to(root / "d", target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)
    (root / "out").symlink_to(outside, target_is_directory=True)
    everything = ["d", "d/up", "d/up/up", "x1", "x2", "x3"]
    assert scan_root(str(root)) == RootListing(everything, False)
    assert scan_root(str(root), max_adapters=2) == RootListing(["d", "x1"], True)
    # the root's 7 entries, then none of d's
    assert scan_root(str(root), max_scanned=7) == RootListing(["d", "x1", "x2", "x3"], True)
