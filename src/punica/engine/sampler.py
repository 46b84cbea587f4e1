"""Sampling of one step, vectorised over the sampled rows: penalties, temperature, top-k, top-p,
min-p, then greedy argmax or an exponential race (argmax p / E, E ~ Exp(1)) whose noise comes from
each request's own generator when it has a seed, so a seeded request is reproducible whatever it
is batched with.
"""

from __future__ import annotations

import torch

from punica.engine.sampling_params import SamplingParams


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)[:, None]


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams],
                    prompt_ids: list[list[int]], output_ids: list[list[int]]) -> torch.Tensor:
    """Repetition (prompt + output, HF style), presence and frequency (output, OpenAI style)."""
    n, vocab = logits.shape
    dev = logits.device
    if not any(p.penalised for p in params):
        return logits
    counts = torch.zeros(n, vocab, device=dev)
    seen = torch.zeros(n, vocab, dtype=torch.bool, device=dev)
    for i, (prompt, out) in enumerate(zip(prompt_ids, output_ids, strict=True)):
        if out:
            counts[i].index_add_(0, torch.tensor(out, device=dev), torch.ones(len(out),
                                                                               device=dev))
        seen[i, torch.tensor(prompt + out, dtype=torch.int64, device=dev)] = True
    rep = _column([p.repetition_penalty for p in params], dev)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    logits = logits - _column([p.frequency_penalty for p in params], dev) * counts
    return logits - _column([p.presence_penalty for p in params], dev) * (counts > 0)


def _filters(p: SamplingParams) -> bool:
    return p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0


def filter_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p masks (-inf outside); the vocabulary sort only
    where some row filters."""
    dev = logits.device
    temps = _column([p.temperature if p.temperature > 0 else 1.0 for p in params], dev)
    logits = logits / temps
    if not any(_filters(p) for p in params):
        return logits
    vocab = logits.shape[1]
    ks = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params], device=dev)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=dev)[None, :]
    drop = ranks >= ks[:, None]
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass strictly before each token
    drop |= before >= _column([p.top_p for p in params], dev)
    drop |= probs < _column([p.min_p for p in params], dev) * probs[:, :1]
    drop[:, 0] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _exponential_noise(like: torch.Tensor, generators: list[torch.Generator | None],
                       default: torch.Generator | None) -> torch.Tensor:
    """E ~ Exp(1) per logit: rows with their own generator draw from it (reproducible whatever
    the batch), the others in one draw from `default`."""
    noise = torch.empty_like(like)
    if any(g is None for g in generators):
        noise.exponential_(generator=default)
    for i, gen in enumerate(generators):
        if gen is not None:
            noise[i].exponential_(generator=gen)
    return noise


def sample_tokens(logits: torch.Tensor, params: list[SamplingParams],
                  prompt_ids: list[list[int]], output_ids: list[list[int]],
                  generators: list[torch.Generator | None],
                  default_generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One token per row of float32 `logits` [N, vocab], left on the device: (tokens [N] int64,
    the raw log-softmax [N, vocab] when a row asks for logprobs, else None). No host sync.

    A row's generator (None: the shared `default_generator`) supplies its sampling noise. An
    all-greedy batch without penalties is one argmax."""
    raw_logprobs = (logits.log_softmax(-1) if any(p.logprobs is not None for p in params)
                    else None)
    logits = apply_penalties(logits, params, prompt_ids, output_ids)
    greedy_ids = logits.argmax(-1)
    if all(p.greedy for p in params):
        return greedy_ids, raw_logprobs
    probs = filter_logits(logits, params).softmax(-1)
    sampled = (probs / _exponential_noise(probs, generators, default_generator)).argmax(-1)
    is_greedy = torch.tensor([p.greedy for p in params], device=logits.device)
    return torch.where(is_greedy, greedy_ids, sampled), raw_logprobs


def logprobs_of(logprobs: torch.Tensor | None, tokens: list[int],
                params: list[SamplingParams]) -> list[dict[int, float] | None]:
    """Per row: None, or {sampled token: logprob} plus the top `params.logprobs` entries."""
    if logprobs is None:
        return [None] * len(tokens)
    return _logprobs(logprobs, tokens, params)


def _logprobs(logprobs: torch.Tensor, tokens: list[int], params: list[SamplingParams]
              ) -> list[dict[int, float] | None]:
    out: list[dict[int, float] | None] = []
    for i, (tok, p) in enumerate(zip(tokens, params, strict=True)):
        if p.logprobs is None:
            out.append(None)
            continue
        top = logprobs[i].topk(p.logprobs) if p.logprobs > 0 else None
        entry = {tok: float(logprobs[i, tok])}
        if top is not None:
            entry.update(zip(top.indices.tolist(), top.values.tolist(), strict=True))
        out.append(entry)
    return out
