"""`punica serve` with no --model builds the demo (HF + PEFT formats) and serves it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.server.conftest import free_port


def test_serve_without_model_serves_the_demo(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PUNICA_CACHE"] = str(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "punica.cli", "serve", "--port", str(port),
                             "--device", "cpu"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(400):
            if proc.poll() is not None:
                raise AssertionError(proc.stdout.read().decode()[-2000:])
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        models = {m["id"]: m["parent"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
        assert models == {"punica-demo": None, "upper": "punica-demo",
                          "reverse": "punica-demo", "sort": "punica-demo"}
        answers = {}
        for model in models:
            r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
                "model": model, "max_tokens": 6, "temperature": 0,
                "messages": [{"role": "user", "content": "sort these words please"}]})
            assert r.status_code == 200, r.text
            answers[model] = r.json()["choices"][0]["message"]["content"]
        assert len(set(answers.values())) > 1  # the adapters change the answer
        assert (tmp_path / "demo-v1-random" / ".complete").is_file()
    finally:
        proc.terminate()
        proc.wait(timeout=15)
