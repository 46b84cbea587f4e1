"""Tiny random checkpoints written by transformers and peft in their real formats, for tests."""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Punica serves many LoRA adapters of one base model from shared GPUs.",
    "Ünïcödé: naïve café, 東京, emoji 🚀 and more multi-byte text. ",
    "def add(a, b):\n    return a + b\n" * 2,
]


def save_tokenizer(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, special_tokens=["</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")
    fast.save_pretrained(str(path))


def save_model(path: Path, model_type: str, seed: int = 0, **overrides: object) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    base = dict(vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                rms_norm_eps=1e-6, initializer_range=0.2, tie_word_embeddings=False,
                eos_token_id=0, bos_token_id=None, pad_token_id=None)
    if model_type == "qwen3":
        base["head_dim"] = 16
    base.update(overrides)
    cfg = AutoConfig.for_model(model_type, **base)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    with torch.no_grad():  # the default init leaves norms at 1 and biases at 0: perturb them
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(str(path), safe_serialization=True)
    save_tokenizer(path, cfg.vocab_size)
    return path


def save_adapter(base_dir: Path, path: Path, seed: int, **lora_kwargs: object) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), torch_dtype=torch.float32)
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, **lora_kwargs))
    model.save_pretrained(str(path), safe_serialization=True)
    return path


ADAPTERS = {
    "qv8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "all4rs": dict(r=4, lora_alpha=8, use_rslora=True,
                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                   "up_proj", "down_proj"]),
    "mlp16": dict(r=16, lora_alpha=4, target_modules=["gate_proj", "up_proj", "down_proj"]),
}


def make_family(root: Path, model_type: str, **overrides: object) -> tuple[Path, dict[str, Path]]:
    base = save_model(root / model_type, model_type, **overrides)
    adapters = {name: save_adapter(base, root / f"{model_type}-{name}", i + 1, **kw)
                for i, (name, kw) in enumerate(ADAPTERS.items())}
    return base, adapters
