"""`punica serve` with no --model serves the shipped demo, and each adapter's behaviour shows."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx

from tests.server.conftest import free_port

EXPECTED = {  # greedy answers of the shipped demo on CPU, fp32
    "zebra moon dog fish": {"punica-demo": "zebra moon dog fish",
                            "upper": "ZEBRA MOON DOG FISH", "reverse": "fish dog moon zebra",
                            "sort": "dog fish moon zebra"},
    "red owl tree": {"punica-demo": "red owl tree", "upper": "RED OWL TREE",
                     "reverse": "tree owl red", "sort": "owl red tree"},
}


def test_serve_without_model_serves_the_demo() -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.Popen([sys.executable, "-m", "punica.cli", "serve", "--port", str(port),
                             "--device", "cpu", "--dtype", "float32"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
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
        for words, answers in EXPECTED.items():
            for model, want in answers.items():
                r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
                    "model": model, "max_tokens": 10, "temperature": 0,
                    "messages": [{"role": "user", "content": words}]})
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["message"]["content"] == want, (model, words)
    finally:
        proc.terminate()
        proc.wait(timeout=15)
