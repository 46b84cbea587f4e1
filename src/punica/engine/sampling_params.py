"""Per-request sampling parameters, validated on construction (InvalidRequestError)."""

from __future__ import annotations

from dataclasses import dataclass

from punica.errors import InvalidRequestError


def _check(ok: bool, name: str, expected: str, got: object) -> None:
    if not ok:
        raise InvalidRequestError(f"{name}: expected {expected}, got {got!r}")


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    """Independent completions per prompt."""
    max_tokens: int = 16
    """Most new tokens (the sequence also stops at max_model_len)."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = -1
    """-1 or 0: off."""
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    """Per-request generator seed: the same seed gives the same tokens."""
    stop: tuple[str, ...] = ()
    """Stop strings (not included in the output text)."""
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    """Also return the logprob of the sampled token and of the top `logprobs` tokens."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check(isinstance(self.n, int) and self.n >= 1, "n", "an integer >= 1", self.n)
        _check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens",
               "an integer >= 1", self.max_tokens)
        _check(0.0 <= self.temperature <= 100.0, "temperature", "a number in [0, 100]",
               self.temperature)
        _check(0.0 < self.top_p <= 1.0, "top_p", "a number in (0, 1]", self.top_p)
        _check(isinstance(self.top_k, int) and -1 <= self.top_k < 2**31, "top_k",
               "-1, 0 (off) or a positive integer below 2^31", self.top_k)
        _check(0.0 <= self.min_p <= 1.0, "min_p", "a number in [0, 1]", self.min_p)
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(-2.0 <= value <= 2.0, name, "a number in [-2, 2]", value)
        _check(0.0 < self.repetition_penalty <= 10.0, "repetition_penalty",
               "a number in (0, 10]", self.repetition_penalty)
        _check(self.seed is None or (isinstance(self.seed, int) and
                                     -(2**63) <= self.seed <= 2**63 - self.n), "seed",
               f"None or an integer in [-2^63, 2^63 - n] (n = {self.n})", self.seed)
        _check(all(isinstance(s, str) and s for s in self.stop), "stop",
               "non-empty strings", self.stop)
        _check(all(isinstance(t, int) and 0 <= t < 2**31 for t in self.stop_token_ids),
               "stop_token_ids", "integers in [0, 2^31)", self.stop_token_ids)
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs
                                         <= 20), "logprobs", "None or an integer in [0, 20]",
               self.logprobs)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalised(self) -> bool:
        """Whether sampling reads the request's earlier tokens (any penalty set)."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or
                self.frequency_penalty != 0.0)
