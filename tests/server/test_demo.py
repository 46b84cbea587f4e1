"""`punica serve` with no --model serves the shipped demo, and each adapter's behaviour shows."""

from __future__ import annotations

import httpx

from tests.server.conftest import punica_serve

EXPECTED = {  # greedy answers of the shipped demo on CPU, fp32
    "zebra moon dog fish": {"punica-demo": "zebra moon dog fish",
                            "upper": "ZEBRA MOON DOG FISH", "reverse": "fish dog moon zebra",
                            "sort": "dog fish moon zebra"},
    "red owl tree": {"punica-demo": "red owl tree", "upper": "RED OWL TREE",
                     "reverse": "tree owl red", "sort": "owl red tree"},
}


def test_serve_without_model_serves_the_demo() -> None:
    with punica_serve("--device", "cpu", "--dtype", "float32") as url:
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
