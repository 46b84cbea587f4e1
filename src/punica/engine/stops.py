"""Prompt validation, token appending with incremental detokenisation, and stop conditions."""

from __future__ import annotations

from punica.engine.sampling_params import SamplingParams
from punica.engine.sequence import Sequence
from punica.errors import InvalidRequestError, PromptTooLongError
from punica.tokens import IncrementalDetokenizer


class StopChecker:
    def __init__(self, tokenizer: object | None, eos_ids: tuple[int, ...],
                 max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids)
        self.max_model_len = max_model_len
        self._detok: dict[int, IncrementalDetokenizer] = {}

    def validate_prompt(self, prompt_ids: list[int], vocab_size: int,
                        params: SamplingParams | None = None) -> None:
        if not prompt_ids:
            raise InvalidRequestError("prompt: expected at least one token, got an empty prompt")
        bad = [t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequestError(f"prompt: token ids must be integers in [0, {vocab_size}),"
                                      f" got {bad[:4]}")
        if params is not None and any(t >= vocab_size for t in params.stop_token_ids):
            raise InvalidRequestError(f"stop_token_ids: token ids must be below {vocab_size}, "
                                      f"got {list(params.stop_token_ids)[:4]}")
        if len(prompt_ids) >= self.max_model_len:
            raise PromptTooLongError(f"prompt: {len(prompt_ids)} tokens, but max_model_len is "
                                     f"{self.max_model_len} (the prompt must leave room for at "
                                     "least one new token)")

    def start(self, seq: Sequence) -> None:
        if self.tokenizer is not None:
            self._detok[seq.seq_id] = IncrementalDetokenizer(self.tokenizer, seq.prompt_ids)

    def forget(self, seq: Sequence) -> None:
        """Drop what is kept for `seq` (it finished, failed or was aborted)."""
        self._detok.pop(seq.seq_id, None)

    @property
    def num_open(self) -> int:
        return len(self._detok)

    def finishes_by_length(self, seq: Sequence) -> bool:
        """Whether the next token appended ends `seq` by max_tokens or max_model_len."""
        return (len(seq.output_ids) + 1 >= seq.params.max_tokens or
                seq.num_tokens + 1 >= self.max_model_len)

    def append(self, seq: Sequence, token: int, logprobs: dict[int, float] | None) -> str | None:
        """Add a sampled token; return the finish reason if the sequence is done."""
        seq.output_ids.append(token)
        if logprobs is not None:
            seq.logprobs.append(logprobs)
        p = seq.params
        reason = None
        detok = self._detok.get(seq.seq_id)
        if detok is not None:
            detok.add(token)
            seq.output_text = detok.text
            for stop in p.stop:
                cut = seq.output_text.find(stop)
                if cut >= 0:
                    seq.output_text = seq.output_text[:cut]
                    reason = "stop"
        if token in p.stop_token_ids or (token in self.eos_ids and not p.ignore_eos):
            reason = reason or "stop"
        if reason is None and (len(seq.output_ids) >= p.max_tokens or
                               seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            self._detok.pop(seq.seq_id, None)
        return reason
