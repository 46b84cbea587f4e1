"""Sampler: exact masks and penalties on hand-made logits; seeds; logprobs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from punica.engine.sampler import apply_penalties, filter_logits, logprobs_of, sample_tokens
from punica.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class Sampled:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]


def sample(logits: torch.Tensor, params: list[SamplingParams], prompt_ids: list[list[int]],
           output_ids: list[list[int]], generators: list[torch.Generator | None],
           default_generator: torch.Generator | None = None) -> Sampled:
    """sample_tokens, then the tokens and their logprobs on the host (as the engine does)."""
    tokens, raw = sample_tokens(logits, params, prompt_ids, output_ids, generators,
                                default_generator)
    ids = tokens.tolist()
    return Sampled(ids, logprobs_of(raw, ids, params))

LOGITS = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))


def kept(params: SamplingParams) -> list[bool]:
    return torch.isfinite(filter_logits(LOGITS.clone(), [params]))[0].tolist()


def test_top_k_top_p_min_p_masks() -> None:
    assert kept(SamplingParams(top_k=2)) == [True, True, False, False]
    assert kept(SamplingParams(top_p=0.5)) == [True, False, False, False]
    assert kept(SamplingParams(top_p=0.7)) == [True, True, False, False]
    assert kept(SamplingParams(top_p=0.76)) == [True, True, True, False]
    assert kept(SamplingParams(min_p=0.35)) == [True, True, False, False]  # p >= 0.175
    assert kept(SamplingParams(min_p=0.99)) == [True, False, False, False]
    assert kept(SamplingParams()) == [True] * 4


def test_temperature_scales_logits() -> None:
    out = filter_logits(LOGITS.clone(), [SamplingParams(temperature=2.0)])
    torch.testing.assert_close(out, LOGITS / 2)


def test_penalties() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    out = apply_penalties(logits.clone(), [SamplingParams(repetition_penalty=2.0)], [[0]], [[1]])
    torch.testing.assert_close(out, torch.tensor([[1.0, -2.0, 0.5, 3.0]]))
    out = apply_penalties(logits.clone(), [SamplingParams(frequency_penalty=0.5,
                                                          presence_penalty=1.0)], [[3]],
                          [[2, 2, 0]])
    torch.testing.assert_close(out, torch.tensor([[0.5, -1.0, -1.5, 3.0]]))


def test_greedy_seeded_and_logprobs() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=0.0, logprobs=3), SamplingParams(seed=5, logprobs=0),
              SamplingParams(top_k=1)]
    gens = [None, torch.Generator().manual_seed(5), torch.Generator().manual_seed(1)]
    res = sample(logits, params, [[1]] * 3, [[]] * 3, gens)
    assert res.token_ids[0] == logits[0].argmax().item()
    assert res.token_ids[2] == logits[2].argmax().item()
    again = sample(logits, params, [[1]] * 3, [[]] * 3,
                   [None, torch.Generator().manual_seed(5), None])
    assert again.token_ids[1] == res.token_ids[1]
    lp = res.logprobs[0]
    assert len(lp) == 3 and res.token_ids[0] in lp
    assert math.isclose(lp[res.token_ids[0]], logits[0].log_softmax(-1).max().item(),
                        rel_tol=1e-6)
    assert list(res.logprobs[1]) == [res.token_ids[1]] and res.logprobs[2] is None


def test_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).repeat(4000, 1)
    params = [SamplingParams()] * 4000
    res = sample(logits, params, [[0]] * 4000, [[]] * 4000,
                 [torch.Generator().manual_seed(0)] * 4000)
    freq = torch.bincount(torch.tensor(res.token_ids), minlength=3).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03, rtol=0)


def test_greedy_batch_is_one_argmax_without_logprobs() -> None:
    torch.manual_seed(1)
    logits = torch.randn(5, 40)
    res = sample(logits, [SamplingParams(temperature=0.0)] * 5, [[1]] * 5, [[]] * 5, [None] * 5)
    assert res.token_ids == logits.argmax(-1).tolist()
    assert res.logprobs == [None] * 5


def test_filters_off_is_temperature_only() -> None:
    torch.manual_seed(2)
    logits = torch.randn(3, 30)
    params = [SamplingParams(temperature=t) for t in (0.5, 1.0, 2.0)]
    out = filter_logits(logits, params)
    torch.testing.assert_close(out, logits / torch.tensor([[0.5], [1.0], [2.0]]))
    # one filtering row: the others are unchanged by the sorted path
    mixed = filter_logits(logits, params[:2] + [SamplingParams(temperature=2.0, top_k=3)])
    torch.testing.assert_close(mixed[:2], out[:2])
    assert int(torch.isfinite(mixed[2]).sum()) == 3


def test_shared_generator_rows_follow_the_distribution_and_seeds_hold() -> None:
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).repeat(4000, 1)
    params = [SamplingParams()] * 4000
    res = sample(logits, params, [[0]] * 4000, [[]] * 4000, [None] * 4000,
                 torch.Generator().manual_seed(3))
    freq = torch.bincount(torch.tensor(res.token_ids), minlength=3).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03, rtol=0)
    seeded = [SamplingParams(seed=9)]
    alone = sample(logits[:1], seeded, [[0]], [[]], [torch.Generator().manual_seed(9)])
    for companions in (3, 17):
        batch = sample(logits[: companions + 1], [SamplingParams()] * companions + seeded,
                       [[0]] * (companions + 1), [[]] * (companions + 1),
                       [None] * companions + [torch.Generator().manual_seed(9)],
                       torch.Generator().manual_seed(companions))
        assert batch.token_ids[-1] == alone.token_ids[0]
