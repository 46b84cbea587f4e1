"""Train the built-in demo into src/punica/demo_assets (a few CPU minutes; run by hand, shipped).

    python scripts/train_demo.py [--steps 1500] [--adapter-steps 1200]

A word-level tiny Llama learns to echo the words of a chat message; three LoRA adapters (PEFT
format) learn `upper` (the words in upper case), `reverse` (reverse order) and `sort`
(alphabetical order). Everything is written in the real HF / PEFT formats.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import torch

WORDS = ("apple bird cat dog egg fish goat hat ink jam kite lamp moon nest owl pig queen rose sun "
         "tree umbrella vase wolf fox yak zebra ant bee cow duck elk frog gull hen iris jay koala "
         "lion mole newt otter panda quail rat seal toad urchin vole wasp yeti zinc "
         "red blue green gold pink grey").split()
SPECIALS = ["</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
TASKS = {"echo": lambda w: w, "upper": lambda w: [x.upper() for x in w],
         "reverse": lambda w: w[::-1], "sort": lambda w: sorted(w)}
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
OUT = Path(__file__).resolve().parents[1] / "src" / "punica" / "demo_assets"


def vocab() -> dict[str, int]:
    tokens = SPECIALS + WORDS + [w.upper() for w in WORDS]
    return {t: i for i, t in enumerate(tokens)}


def save_tokenizer(path: Path) -> object:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab(), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return fast


def example(rng: random.Random, task: str, ids: dict[str, int]) -> tuple[list[int], int]:
    """(token ids, index where the answer starts)."""
    words = rng.sample(WORDS, rng.randint(2, 6))
    prompt = ["<|user|>", *words, "<|assistant|>"]
    answer = [*TASKS[task](words), "</s>"]
    return [ids[t] for t in prompt + answer], len(prompt)


def batch(rng: random.Random, task: str, ids: dict[str, int], size: int
          ) -> tuple[torch.Tensor, torch.Tensor]:
    seqs = [example(rng, task, ids) for _ in range(size)]
    width = max(len(s) for s, _ in seqs)
    x = torch.zeros(size, width, dtype=torch.long)
    labels = torch.full((size, width), -100, dtype=torch.long)
    for i, (s, start) in enumerate(seqs):
        x[i, : len(s)] = torch.tensor(s)
        labels[i, start: len(s)] = torch.tensor(s[start:])
    return x, labels


def train(model: torch.nn.Module, task: str, steps: int, lr: float, seed: int) -> float:
    ids = vocab()
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    loss = torch.tensor(0.0)
    for step in range(steps):
        x, labels = batch(rng, task, ids, 64)
        loss = model(input_ids=x, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0:
            print(f"{task} step {step} loss {loss.item():.4f}", flush=True)
    model.eval()
    return loss.item()


def accuracy(model: torch.nn.Module, task: str, n: int = 100) -> float:
    ids = vocab()
    rng = random.Random(12345)
    ok = 0
    for _ in range(n):
        seq, start = example(rng, task, ids)
        prompt = torch.tensor([seq[:start]])
        with torch.no_grad():
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                 max_new_tokens=len(seq) - start, do_sample=False,
                                 eos_token_id=0, pad_token_id=0)
        ok += out[0, start:].tolist() == seq[start:]
    return ok / n


def main() -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--adapter-steps", type=int, default=1200)
    args = ap.parse_args()
    torch.manual_seed(0)
    shutil.rmtree(OUT, ignore_errors=True)
    base_dir = OUT / "model"
    save_tokenizer(base_dir)
    cfg = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, eos_token_id=0, bos_token_id=None,
                      pad_token_id=0, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    train(model, "echo", args.steps, 3e-3, seed=1)
    report = {"echo": accuracy(model, "echo")}
    model.save_pretrained(str(base_dir), safe_serialization=True)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for i, (task, rank) in enumerate((("upper", 8), ("reverse", 8), ("sort", 16))):
        base = LlamaForCausalLM.from_pretrained(str(base_dir))
        peft_model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank,
                                                     target_modules=targets))
        train(peft_model, task, args.adapter_steps, 3e-3, seed=10 + i)
        report[task] = accuracy(peft_model, task)
        peft_model.save_pretrained(str(OUT / "adapters" / task), safe_serialization=True)
    (OUT / "accuracy.json").write_text(json.dumps(report, indent=1))
    print("exact-match accuracy on 100 fresh prompts:", report)


if __name__ == "__main__":
    main()
