"""The engine with the Triton paged-attention kernels (interpreter on CPU, native on a GPU) gives
the same greedy tokens as with the torch reference attention, on a mixed batch with chunked
prefill and preemption."""

from __future__ import annotations

from pathlib import Path

import pytest

from punica import LLM, SamplingParams
from punica.models import attention_backends
from punica.ops.attention import paged_decode
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


def test_split_decode_matches_torch_attention(device: object,
                                              family: tuple[Path, dict[str, Path]],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Contexts past 32 tokens: with decode_split_tokens 32 the engine's decode steps split
    them over programs merged in the kernel (DecodeSplit), and the greedy tokens and logprobs
    are the torch reference attention's; with 0 it never splits."""
    base, adapters = family
    reqs = [(p, a, 30 + m) for p, a, m in requests_for(384)[:3]]  # contexts up to 51 tokens
    split_calls = []

    def counting_decode(*args: object, **kwargs: object) -> object:
        split_calls.append(kwargs.get("workspace") is not None)
        return paged_decode(*args, **kwargs)

    monkeypatch.setattr(attention_backends, "paged_decode", counting_decode)
    results = {}
    for backend, split_tokens in (("torch", 0), ("triton", 32)):
        llm = LLM(str(base), dtype="float32", device=str(device), max_loras=2, max_lora_rank=16,
                  max_num_batched_tokens=16, max_num_seqs=3, block_size=4, num_kv_blocks=48,
                  max_model_len=96, attention_backend=backend,
                  decode_split_tokens=split_tokens)
        split = llm.engine.runner.decode_split
        assert (split is None) == (backend == "torch")
        if split is not None:
            assert (split.workspace.num_splits, split.split_tokens) == (3, 32)
        for name, path in adapters.items():
            llm.load_lora(name, str(path))
        results[backend] = llm.generate(
            [p for p, _, _ in reqs], [SamplingParams(max_tokens=m, temperature=0.0, logprobs=1)
                                      for _, _, m in reqs],
            lora=[a for _, a, _ in reqs], use_tqdm=False)
    assert any(split_calls) and not all(split_calls)  # some decode steps split, some did not
    for a, b in zip(results["torch"], results["triton"], strict=True):
        assert a.token_ids == b.token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            for tok, lp in la.items():
                assert abs(lp - lb[tok]) < 1e-4
