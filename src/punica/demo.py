"""The built-in demo: a tiny word-level LLaMA-architecture model that echoes the words of a chat
message, and three LoRA adapters that change what it does with them: `upper` (upper case),
`reverse` (reverse order) and `sort` (alphabetical order). Shipped in the real HF / PEFT formats
under `demo_assets/` (3.5 MB), made by `scripts/train_demo.py` in a few CPU minutes; its
exact-match accuracy on fresh prompts is in `demo_assets/accuracy.json`.

The vocabulary is the word list of that script (lower- and upper-case); other words are <unk>.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "demo_assets"
ADAPTERS = ("upper", "reverse", "sort")
SERVED_NAME = "punica-demo"


def ensure_demo() -> tuple[Path, dict[str, Path]]:
    """(model dir, {adapter: dir}) of the shipped demo."""
    base = ASSETS / "model"
    adapters = {name: ASSETS / "adapters" / name for name in ADAPTERS}
    missing = [p for p in [base, *adapters.values()] if not p.is_dir()]
    if missing:
        raise FileNotFoundError(f"demo assets missing: {missing} (run scripts/train_demo.py)")
    return base, adapters
