"""Step time of one engine as a linear model of its batch:

    t = c0 + c_batch * B + c_prefill * prefill_tokens + c_kv * kv_tokens      (seconds)

Defaults come from the LLaMA-2-7B floors on the H200 (ANCHORS.md): 13.5 GB of weights at
4.13 TB/s (3.3 ms, with overhead about 4 ms), 0.5 MB of KV per token, about 14 GFLOP per prefill
token at ~400 TFLOP/s; `fit` replaces them with a least-squares fit to a decode.json run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class StepModel:
    c0: float = 4.0e-3
    c_batch: float = 5.0e-5
    c_prefill: float = 3.5e-5
    c_kv: float = 1.25e-7
    source: str = "defaults from the 7B floors"

    def step_s(self, batch: int, prefill_tokens: int, kv_tokens: int) -> float:
        return (self.c0 + self.c_batch * batch + self.c_prefill * prefill_tokens
                + self.c_kv * kv_tokens)

    @classmethod
    def fit(cls, decode_json: str | Path) -> StepModel:
        """Least squares over the decode rows (batch, batch x context) and prefill rows."""
        rows = [r for r in json.loads(Path(decode_json).read_text())["rows"]
                if "step_ms" in r]
        if len(rows) < 4:
            raise ValueError(f"{decode_json}: too few measured rows to fit a step model")
        x, y = [], []
        for r in rows:
            prefill = r["batch"] * r["context"] if r["kind"] == "prefill" else 0
            decode_batch = 0 if r["kind"] == "prefill" else r["batch"]
            x.append([1.0, decode_batch, prefill, r["batch"] * r["context"]])
            y.append(r["step_ms"] / 1e3)
        coef = torch.linalg.lstsq(torch.tensor(x, dtype=torch.float64),
                                  torch.tensor(y, dtype=torch.float64)[:, None]).solution
        c = [max(float(v), 0.0) for v in coef[:, 0]]
        return cls(c[0], c[1], c[2], c[3], source=str(decode_json))
