"""The built-in demo: a tiny LLaMA-architecture checkpoint with a tokenizer and chat template,
and three LoRA adapters (`upper`, `reverse`, `sort`), written in the real HF / PEFT formats
(the same loading code as real models) into a cache folder on first use.

Status: the weights are random (seeded), so the adapters change the answers but do not yet show
their named behaviours; trained weights replace them without changing this layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

DEMO_VERSION = "v1-random"
ADAPTERS = {"upper": 8, "reverse": 8, "sort": 16}
CORPUS = ["the quick brown fox jumps over the lazy dog", "sort these words please",
          "reverse the order of my words", "UPPER CASE LETTERS AND lower case letters",
          "alpha beta gamma delta epsilon zeta eta theta", "one two three four five six"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def cache_dir() -> Path:
    root = os.environ.get("PUNICA_CACHE") or Path.home() / ".cache" / "punica"
    return Path(root) / f"demo-{DEMO_VERSION}"


def _tokenizer(path: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 8, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))


def _model(path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, eos_token_id=0, bos_token_id=None,
                      pad_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(path), safe_serialization=True)


def _adapter(path: Path, rank: int, seed: int, layers: int = 4, hidden: int = 128) -> None:
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    shapes = {"q": (hidden, 128), "k": (hidden, 64), "v": (hidden, 64), "o": (128, hidden),
              "gate": (hidden, 256), "up": (hidden, 256), "down": (256, hidden)}
    tensors = {}
    for layer in range(layers):
        for proj, (in_f, out_f) in shapes.items():
            group = "mlp" if proj in ("gate", "up", "down") else "self_attn"
            key = f"base_model.model.model.layers.{layer}.{group}.{proj}_proj"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_f, generator=gen) / in_f**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, rank, generator=gen) * 0.05
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
              "target_modules": [f"{p}_proj" for p in shapes], "use_rslora": False}
    (path / "adapter_config.json").write_text(json.dumps(config, indent=1))


def ensure_demo() -> tuple[Path, dict[str, Path]]:
    """(model dir, {adapter: dir}) of the demo, built into the cache folder if missing."""
    root = cache_dir()
    base, done = root / "model", root / ".complete"
    adapters = {name: root / "adapters" / name for name in ADAPTERS}
    if not done.is_file():
        base.mkdir(parents=True, exist_ok=True)
        _model(base)
        _tokenizer(base, 512)
        for i, (name, rank) in enumerate(ADAPTERS.items()):
            _adapter(adapters[name], rank, seed=i + 1)
        done.write_text(DEMO_VERSION)
    return base, adapters
