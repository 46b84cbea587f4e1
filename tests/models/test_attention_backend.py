"""The engine with the Triton paged-attention kernels (interpreter on CPU, native on a GPU) gives
the same greedy tokens as with the torch reference attention, on a mixed batch with chunked
prefill and preemption."""

from __future__ import annotations

from pathlib import Path

import pytest

from punica import LLM, SamplingParams
from tests.checkpoints import make_family
from tests.models.test_generation_vs_hf import LLAMA3_ROPE, requests_for


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    return make_family(tmp_path_factory.mktemp("attn"), "llama", rope_scaling=LLAMA3_ROPE)


def test_triton_attention_matches_torch_attention(device: object,
                                                  family: tuple[Path, dict[str, Path]]) -> None:
    base, adapters = family
    reqs = requests_for(384)[:5]
    results = {}
    for backend in ("torch", "triton"):
        llm = LLM(str(base), dtype="float32", device=str(device), max_loras=2, max_lora_rank=16,
                  max_num_batched_tokens=12, max_num_seqs=4, block_size=4, num_kv_blocks=12,
                  max_model_len=48, attention_backend=backend)
        for name, path in adapters.items():
            llm.load_lora(name, str(path))
        outs = llm.generate([p for p, _, _ in reqs],
                            [SamplingParams(max_tokens=m, temperature=0.0, logprobs=1)
                             for _, _, m in reqs], lora=[a for _, a, _ in reqs], use_tqdm=False)
        results[backend] = outs
    for a, b in zip(results["torch"], results["triton"], strict=True):
        assert a.token_ids == b.token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            for tok, lp in la.items():
                assert abs(lp - lb[tok]) < 1e-4
