"""Tokenizer access (the model directory's, through transformers, offline) and incremental
detokenisation that never emits half of a multi-byte character."""

from __future__ import annotations

from pathlib import Path

from punica.errors import ModelLoadError


def load_tokenizer(model_dir: str | Path) -> object | None:
    """The directory's tokenizer, or None when it has none (token-id prompts still work)."""
    path = Path(model_dir)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                              "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{path}: tokenizer could not be loaded ({err})") from err


class IncrementalDetokenizer:
    """Text of a growing token list: re-decodes a short window and emits only complete text.

    Text ending in U+FFFD (an incomplete UTF-8 sequence) is held back until the next token
    completes it.
    """

    def __init__(self, tokenizer: object, prompt_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start (tokens) for decoding
        self.read_offset = 0  # tokens already turned into emitted text
        self.text = ""

    def add(self, token_id: int) -> str:
        """Append a token; return the newly completed text (possibly empty)."""
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset: self.read_offset], skip_special_tokens=True)
        full = decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        new = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += new
        return new
