"""A real `punica serve` process (and a `punica cluster` one: the same API from two engines on a
local Ray cluster) on a free port over a tiny checkpoint with a chat template."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

# The GPU machine's image has no FastAPI/uvicorn: the server tests run in CI, skipped there.
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
import httpx  # noqa: E402

from tests.checkpoints import ADAPTERS, save_adapter, save_model

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
API_KEY = "test-key"
SERVER_LOGS: dict[str, str] = {}
"""What each stopped server printed, by URL (for tests of its logging)."""


@dataclass
class Running:
    url: str
    model_dir: Path
    adapters: dict[str, Path]
    lora_root: Path
    cluster: bool = False
    """Whether `url` is a `punica cluster` (no /metrics; /cluster/status instead)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def punica_serve(*args: str, wait_s: float = 120.0, command: str = "serve") -> Iterator[str]:
    """Run `punica serve ARGS --port P` (or another serving command; torch reference ops, no
    interpreter) until /health answers; yield its URL; stop it afterwards."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    log = tempfile.NamedTemporaryFile("w+b", prefix="punica-serve-", suffix=".log")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "punica.cli", command, *args, "--port",
                             str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + wait_s
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"server exited: {log.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"server did not come up in {wait_s} s")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.seek(0)
        SERVER_LOGS[url] = log.read().decode(errors="replace")
        log.close()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Running:
    """The tiny model (with a chat template) and its adapters; `url` is not set."""
    root = tmp_path_factory.mktemp("server")
    base = save_model(root / "tiny-llama", "llama")
    cfg = base / "tokenizer_config.json"
    import json

    tok_cfg = json.loads(cfg.read_text())
    tok_cfg["chat_template"] = CHAT_TEMPLATE
    cfg.write_text(json.dumps(tok_cfg))
    lora_root = root / "loras"
    adapters = {n: save_adapter(base, lora_root / n, i + 1, **ADAPTERS[n])
                for i, n in enumerate(("qv8", "all4rs"))}
    return Running("", base, adapters, lora_root)


def serve_flags(c: Running) -> tuple[str, ...]:
    return ("--model", str(c.model_dir), "--device", "cpu", "--dtype", "float32",
            "--max-model-len", "64", "--api-key", API_KEY, "--lora-modules",
            f"qv8={c.adapters['qv8']}", "--lora-root", str(c.lora_root), "--max-loras", "2",
            "--max-lora-rank", "16", "--max-in-flight", "256")


@pytest.fixture(scope="session")
def serve_server(checkpoint: Running) -> Iterator[Running]:
    with punica_serve(*serve_flags(checkpoint)) as url:
        yield replace(checkpoint, url=url)


@pytest.fixture(scope="session")
def server(serve_server: Running) -> Running:
    """`punica serve` (test modules may override it to also run against the cluster)."""
    return serve_server


@pytest.fixture(scope="session")
def cluster_server(checkpoint: Running) -> Iterator[Running]:
    """`punica cluster` with two CPU engines (skipped where Ray is missing)."""
    pytest.importorskip("ray")
    with punica_serve(*serve_flags(checkpoint), "--num-engines", "2", "--cpus-per-engine",
                      "1", command="cluster", wait_s=240) as url:
        yield replace(checkpoint, url=url)
