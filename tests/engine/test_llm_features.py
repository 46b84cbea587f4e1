"""Offline API features: seeds, n > 1, stops, logprobs, detokenisation, tied and sharded
checkpoints, a Mistral checkpoint against HF."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from punica import LLM, SamplingParams
from punica.tokens import IncrementalDetokenizer, load_tokenizer
from tests.checkpoints import save_model


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    base = save_model(tmp_path_factory.mktemp("feat") / "llama", "llama")
    return LLM(str(base), dtype="float32", device="cpu", max_model_len=64)


def test_seeded_requests_are_reproducible_in_any_batch(llm: LLM) -> None:
    p = SamplingParams(max_tokens=8, temperature=1.0, seed=123, ignore_eos=True)
    alone = llm.generate([[5, 6, 7]], p, use_tqdm=False)[0].token_ids
    mixed = llm.generate([[9, 9], [5, 6, 7], [1]], [SamplingParams(max_tokens=5), p,
                                                    SamplingParams(max_tokens=3)],
                         use_tqdm=False)
    assert mixed[1].token_ids == alone


def test_n_completions_and_lengths(llm: LLM) -> None:
    out = llm.generate([[3, 4]], SamplingParams(n=3, max_tokens=4, seed=1, ignore_eos=True),
                       use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 4 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1


def test_stop_token_ids_and_eos(llm: LLM) -> None:
    greedy = llm.generate([[7, 8, 9]], SamplingParams(max_tokens=6, temperature=0.0,
                                                      ignore_eos=True), use_tqdm=False)[0]
    stop_at = greedy.token_ids[2]
    first = greedy.token_ids.index(stop_at)
    out = llm.generate([[7, 8, 9]], SamplingParams(max_tokens=6, temperature=0.0,
                                                   stop_token_ids=[stop_at]), use_tqdm=False)[0]
    assert out.token_ids == greedy.token_ids[: first + 1] and out.finish_reason == "stop"


def test_stop_strings_cut_the_text(llm: LLM) -> None:
    greedy = llm.generate([[7, 8, 9]], SamplingParams(max_tokens=12, temperature=0.0,
                                                      ignore_eos=True), use_tqdm=False)[0]
    text = greedy.text
    stop = next((text[i:i + 2] for i in range(1, len(text) - 1) if text[i:i + 2].strip()),
                None)
    if stop is None:
        pytest.skip("the greedy text has no usable stop string")
    out = llm.generate([[7, 8, 9]], SamplingParams(max_tokens=12, temperature=0.0,
                                                   ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.text == text[: text.find(stop)]


def test_text_prompts_and_logprobs(llm: LLM) -> None:
    out = llm.generate("The quick brown fox", SamplingParams(max_tokens=3, logprobs=2,
                                                             temperature=0.0, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].logprobs) == 3
    for tok, lp in zip(out.token_ids, out.outputs[0].logprobs, strict=True):
        assert tok in lp and lp[tok] == max(lp.values())


def test_incremental_detokenizer_never_splits_characters(tmp_path: Path) -> None:
    base = save_model(tmp_path / "tok", "llama")
    tok = load_tokenizer(base)
    text = "naïve café, 東京 🚀 ok"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    detok = IncrementalDetokenizer(tok, [])
    pieces = [detok.add(t) for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text == detok.text


def _hf_greedy(model_dir: Path, prompt: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=n, do_sample=False, eos_token_id=0, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("model_type,overrides,shard", [
    ("mistral", {"sliding_window": None}, None),
    ("qwen2", {"tie_word_embeddings": True}, None),
    ("llama", {}, "20KB"),
])
def test_checkpoint_variants_match_hf(tmp_path: Path, model_type: str, overrides: dict,
                                      shard: str | None) -> None:
    base = save_model(tmp_path / model_type, model_type, **overrides)
    if shard is not None:  # re-save as a sharded checkpoint with an index
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(base), torch_dtype=torch.float32)
        model.save_pretrained(str(base), max_shard_size=shard)
        (base / "model.safetensors").unlink(missing_ok=True)
        assert (base / "model.safetensors.index.json").is_file()
    prompt = [11, 12, 13, 14, 15]
    llm = LLM(str(base), dtype="float32", device="cpu", max_model_len=64)
    ours = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0),
                        use_tqdm=False)[0].token_ids
    assert ours == _hf_greedy(base, prompt, 8)
