"""The engine on the GPU: fp16/bf16 first-step logprobs near the fp32 reference, and the mixed
batch served with the Triton LoRA kernels agreeing with the torch path."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from punica import LLM, SamplingParams
from tests.checkpoints import make_family
from tests.models.test_generation_vs_hf import LLAMA3_ROPE, requests_for

pytestmark = pytest.mark.gpu
# Max |logprob difference| over the top-5 of the fp32 reference, at a 16-bit dtype.
LOGPROB_TOL = {"float16": 0.02, "bfloat16": 0.12}


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    return make_family(tmp_path_factory.mktemp("gpu"), "llama", rope_scaling=LLAMA3_ROPE)


def make_llm(base: Path, adapters: dict[str, Path], dtype: str, **kw: object) -> LLM:
    kw.setdefault("num_kv_blocks", 64)  # several engines live at once in these tests
    llm = LLM(str(base), dtype=dtype, device="cuda", max_loras=2, max_lora_rank=16,
              max_model_len=48, **kw)
    for name, path in adapters.items():
        llm.load_lora(name, str(path))
    return llm


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_first_step_logprobs_near_fp32(family: tuple[Path, dict[str, Path]], dtype: str) -> None:
    base, adapters = family
    ref, low = make_llm(base, adapters, "float32"), make_llm(base, adapters, dtype)
    prompt = list(range(5, 30))
    for name in [None, *adapters]:
        p = SamplingParams(max_tokens=1, temperature=0.0, logprobs=5)
        want = ref.generate([prompt], p, lora=name, use_tqdm=False)[0].outputs[0].logprobs[0]
        got_all = low.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0,
                                                        logprobs=20), lora=name,
                               use_tqdm=False)[0].outputs[0].logprobs[0]
        for token, lp in want.items():
            assert token in got_all and abs(got_all[token] - lp) < LOGPROB_TOL[dtype]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_triton_lora_path_agrees_with_torch_path(family: tuple[Path, dict[str, Path]],
                                                 dtype: str) -> None:
    base, adapters = family
    reqs = requests_for(384)
    outs = {}
    for backend in ("triton", "torch"):
        llm = make_llm(base, adapters, dtype, max_num_batched_tokens=12, max_num_seqs=5,
                       block_size=4, num_kv_blocks=12)
        llm.engine.lora_pool.backend = backend
        got = llm.generate([p for p, _, _ in reqs],
                           [SamplingParams(max_tokens=m, temperature=0.0, logprobs=5)
                            for _, _, m in reqs], lora=[a for _, a, _ in reqs], use_tqdm=False)
        outs[backend] = got
    tokens = {b: [o.token_ids for o in got] for b, got in outs.items()}
    if dtype == "float32":
        assert tokens["triton"] == tokens["torch"]
    else:  # 16-bit: each path's first token is among the other's top-5, at a logprob within
        # 0.02 of its own; then most tokens
        for i, (a, b) in enumerate(zip(outs["triton"], outs["torch"], strict=True)):
            first = {"triton": a.outputs[0].logprobs[0], "torch": b.outputs[0].logprobs[0]}
            for path, other, top in (("triton", "torch", a.token_ids[0]),
                                     ("torch", "triton", b.token_ids[0])):
                assert top in first[other], (i, path, top, first[other])
                assert abs(first[path][top] - first[other][top]) < 0.02, (i, path, top, first)
        same = sum(x == y for x, y in zip(tokens["triton"], tokens["torch"], strict=True))
        assert same >= len(reqs) - 1


def test_decode_graphs_match_eager(family: tuple[Path, dict[str, Path]]) -> None:
    base, adapters = family
    reqs = requests_for(384)
    tokens = {}
    for eager in (True, False):
        llm = make_llm(base, adapters, "float32", enforce_eager=eager)
        outs = llm.generate([p for p, _, _ in reqs],
                            [SamplingParams(max_tokens=m, temperature=0.0) for _, _, m in reqs],
                            lora=[a for _, a, _ in reqs], use_tqdm=False)
        tokens[eager] = [o.token_ids for o in outs]
        assert (llm.engine.runner.graphs is None) == eager
    assert tokens[True] == tokens[False]


def test_shrink_beside_gemm_matches_shrink_after(family: tuple[Path, dict[str, Path]]) -> None:
    """Step graphs with each LoRA shrink on the side stream beside its GEMM (the default)
    generate the tokens of graphs with the shrink after its GEMM."""
    base, adapters = family
    reqs = requests_for(384)
    tokens = {}
    for beside in (True, False):
        llm = make_llm(base, adapters, "float32", shrink_beside_gemm=beside)
        assert (llm.engine.runner.lora_stream is not None) == beside
        assert (llm.engine.runner.graphs.lora_stream is not None) == beside
        outs = llm.generate([p for p, _, _ in reqs],
                            [SamplingParams(max_tokens=m, temperature=0.0) for _, _, m in reqs],
                            lora=[a for _, a, _ in reqs], use_tqdm=False)
        tokens[beside] = [o.token_ids for o in outs]
    assert tokens[True] == tokens[False]


def test_split_decode_matches_unsplit(family: tuple[Path, dict[str, Path]]) -> None:
    """With decode_split_tokens 32, decode steps whose contexts pass 32 tokens replay the split
    graphs (contexts split in two runs merged in the kernel): the greedy tokens of the engine
    that never splits."""
    base, adapters = family
    reqs = [(p, a, 30 + m) for p, a, m in requests_for(384)]  # contexts up to max_model_len 48
    tokens = {}
    for split_tokens in (32, 0):
        llm = make_llm(base, adapters, "float32", decode_split_tokens=split_tokens)
        assert (llm.engine.runner.decode_split is not None) == (split_tokens > 0)
        outs = llm.generate([p for p, _, _ in reqs],
                            [SamplingParams(max_tokens=m, temperature=0.0) for _, _, m in reqs],
                            lora=[a for _, a, _ in reqs], use_tqdm=False)
        tokens[split_tokens] = [o.token_ids for o in outs]
        used_split = any(key[3] for key in llm.engine.runner.graphs._static)
        assert used_split == (split_tokens > 0)
    assert tokens[32] == tokens[0]


def test_kv_pool_sized_from_free_memory_and_reclaimed_after_free(
        family: tuple[Path, dict[str, Path]]) -> None:
    base, adapters = family
    total = torch.cuda.mem_get_info()[1]
    for _ in range(2):  # the second engine reuses the memory the first one's cache held
        llm = make_llm(base, adapters, "float16", num_kv_blocks=None, gpu_memory_utilization=0.5)
        kv = llm.engine.runner.kv_cache
        assert 0.3 * total < kv.numel() * kv.element_size() < 0.5 * total
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, temperature=0.0),
                           use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 2
        del llm, kv, out
        gc.collect()
