"""Bad input fails with a typed error, and leaves no block, slot or request behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from punica import LLM, SamplingParams
from punica.errors import (
    AdapterInUseError,
    AdapterLoadError,
    AdapterNotFoundError,
    InvalidRequestError,
    ModelLoadError,
    PromptTooLongError,
)
from tests.checkpoints import ADAPTERS, save_adapter, save_model


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, LLM]:
    root = tmp_path_factory.mktemp("errors")
    base = save_model(root / "llama", "llama")
    adapter = save_adapter(base, root / "qv8", 1, **ADAPTERS["qv8"])
    llm = LLM(str(base), dtype="float32", device="cpu", max_loras=2, max_lora_rank=8,
              max_model_len=32)
    llm.load_lora("qv8", str(adapter))
    return root, adapter, llm


def assert_clean(llm: LLM) -> None:
    eng = llm.engine
    assert eng.scheduler.blocks.num_free == eng.scheduler.blocks.num_blocks
    assert eng.slots.pinned() == {} and not eng.has_unfinished()


def test_unknown_adapter(setup: tuple[Path, Path, LLM]) -> None:
    _, _, llm = setup
    with pytest.raises(AdapterNotFoundError, match="'nope' is not loaded"):
        llm.generate([[1, 2, 3], [4, 5]], lora=[None, "nope"], use_tqdm=False)
    assert_clean(llm)
    with pytest.raises(AdapterNotFoundError):
        llm.remove_lora("nope")


def test_adapter_for_another_base(setup: tuple[Path, Path, LLM]) -> None:
    root, _, llm = setup
    other = save_model(root / "wide", "llama", hidden_size=32)
    wrong = save_adapter(other, root / "wide-qv8", 1, **ADAPTERS["qv8"])
    with pytest.raises(AdapterLoadError, match="another base"):
        llm.load_lora("wrong", str(wrong))
    assert "wrong" not in llm.engine.list_loras()


def test_rank_above_max_lora_rank(setup: tuple[Path, Path, LLM]) -> None:
    root, _, llm = setup
    big = save_adapter(Path(llm.engine.config.model.model), root / "r16", 2,
                       **ADAPTERS["mlp16"])
    with pytest.raises(AdapterLoadError, match="rank 16 exceeds max_lora_rank 8"):
        llm.load_lora("big", str(big))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing", "pickle", "dora",
                                    "modules_to_save", "bad_json"])
def test_broken_adapter_directories(setup: tuple[Path, Path, LLM], damage: str,
                                    tmp_path: Path) -> None:
    _, adapter, llm = setup
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    st, cfg_path = bad / "adapter_model.safetensors", bad / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    if damage == "truncate":
        st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    elif damage == "garbage":
        st.write_bytes(b"\x00" * 64)
    elif damage == "missing":
        st.unlink()
    elif damage == "pickle":
        st.rename(bad / "adapter_model.bin")
    elif damage == "dora":
        cfg_path.write_text(json.dumps({**cfg, "use_dora": True}))
    elif damage == "modules_to_save":
        cfg_path.write_text(json.dumps({**cfg, "modules_to_save": ["lm_head"]}))
    else:
        cfg_path.write_text("{not json")
    reasons = {"truncate": "corrupt or truncated", "garbage": "corrupt or truncated",
               "missing": "no adapter_model.safetensors", "pickle": "pickle files are refused",
               "dora": "DoRA", "modules_to_save": "modules_to_save", "bad_json": "not valid JSON"}
    with pytest.raises(AdapterLoadError, match=reasons[damage]):
        llm.load_lora("bad", str(bad))
    assert "bad" not in llm.engine.list_loras()


@pytest.mark.parametrize("prompt,error,match", [
    ([], InvalidRequestError, "empty prompt"),
    (list(range(1, 33)), PromptTooLongError, "32 tokens, but max_model_len is 32"),
    ([1, 10**6], InvalidRequestError, "token ids must be integers"),
])
def test_bad_prompts(setup: tuple[Path, Path, LLM], prompt: list[int], error: type,
                     match: str) -> None:
    _, _, llm = setup
    with pytest.raises(error, match=match):
        llm.generate([[1, 2], prompt], use_tqdm=False)
    assert_clean(llm)


@pytest.mark.parametrize("kwargs,name", [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_k": -2}, "top_k"), ({"n": 0}, "n"),
    ({"min_p": 1.5}, "min_p"), ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"logprobs": 21}, "logprobs"),
    ({"stop": [""]}, "stop"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
])
def test_invalid_sampling_params(kwargs: dict, name: str) -> None:
    with pytest.raises(InvalidRequestError, match=rf"^{name}: expected"):
        SamplingParams(**kwargs)


def test_text_prompt_without_tokenizer(setup: tuple[Path, Path, LLM], tmp_path: Path) -> None:
    root, _, _ = setup
    bare = save_model(tmp_path / "bare", "llama")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / f).unlink(missing_ok=True)
    llm = LLM(str(bare), dtype="float32", device="cpu", max_model_len=32)
    with pytest.raises(InvalidRequestError, match="needs a tokenizer"):
        llm.generate("hello", use_tqdm=False)
    assert_clean(llm)


def test_remove_adapter_in_use_and_reload(setup: tuple[Path, Path, LLM]) -> None:
    _, adapter, llm = setup
    eng = llm.engine
    eng.add_request("busy", [1, 2, 3], SamplingParams(max_tokens=3), "qv8")
    eng.step()
    with pytest.raises(AdapterInUseError, match="already loaded"):
        llm.load_lora("qv8", str(adapter))  # replacing needs intent
    with pytest.raises(AdapterInUseError, match="used by 1 request"):
        eng.load_lora("qv8", str(adapter), replace=True)  # and no request using it
    assert eng.remove_lora("qv8") == ["busy"]  # its request fails, charged to it
    (out,) = eng.step()
    assert out.finished and out.finish_reason == "error"
    assert isinstance(out.error, AdapterNotFoundError) and "unloaded" in str(out.error)
    assert_clean(llm)
    assert eng.list_loras() == []
    llm.load_lora("qv8", str(adapter))
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), lora="qv8", use_tqdm=False)
    assert len(out[0].token_ids) == 2
    assert_clean(llm)


@pytest.mark.parametrize("change,match", [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope scaling type 'yarn'"),
])
def test_unsupported_models_are_refused(tmp_path: Path, change: dict, match: str) -> None:
    base = save_model(tmp_path / "m", "llama")
    cfg = json.loads((base / "config.json").read_text())
    cfg.update(change)
    cfg.pop("rope_parameters", None) if "rope_scaling" in change else None
    (base / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=match):
        LLM(str(base), device="cpu")


def test_sliding_window_is_refused(tmp_path: Path) -> None:
    base = save_model(tmp_path / "m", "mistral", sliding_window=16)
    with pytest.raises(ModelLoadError, match="sliding-window"):
        LLM(str(base), device="cpu")


def test_truncated_checkpoint_is_refused(tmp_path: Path) -> None:
    base = save_model(tmp_path / "m", "llama")
    st = base / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        LLM(str(base), device="cpu")
