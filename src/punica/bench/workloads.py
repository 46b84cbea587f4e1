"""Adapter-popularity mixes from the Punica paper, as segment lengths of one sorted batch.

A batch of n requests sorted by adapter is a list of segment lengths (one segment per adapter):
- Distinct: every request its own adapter -> [1] * n
- Uniform: ceil(sqrt(n)) adapters with equal shares (sizes differ by at most one)
- Skewed: Zipf-like, segment k has floor(1.5 ** k) requests (1, 1, 2, 3, 5, 7, ...), the last takes
  the remainder; sorted most popular first
- Identical: one adapter for all -> [n]
- Pair: the two-segment case [1, n - 1] that once broke Punica's own kernel
"""

from __future__ import annotations

import math

MIXES = ("distinct", "uniform", "skewed", "identical", "pair")


def segment_lengths(mix: str, n: int) -> list[int]:
    """Segment lengths (each >= 1, summing to n) of a sorted batch of n requests under `mix`."""
    if n < 1:
        raise ValueError(f"n: expected >= 1, got {n}")
    if mix == "distinct":
        return [1] * n
    if mix == "identical":
        return [n]
    if mix == "uniform":
        groups = math.ceil(math.sqrt(n))
        base, extra = divmod(n, groups)
        return [base + (1 if i < extra else 0) for i in range(groups)]
    if mix == "skewed":
        return _skewed(n)
    if mix == "pair":
        return [1, n - 1] if n > 1 else [1]
    raise ValueError(f"mix: expected one of {MIXES}, got {mix!r}")


def _skewed(n: int) -> list[int]:
    lengths: list[int] = []
    k = 0
    while sum(lengths) < n:
        lengths.append(min(math.floor(1.5**k), n - sum(lengths)))
        k += 1
    return sorted(lengths, reverse=True)


def indptr_of(lengths: list[int]) -> list[int]:
    """Prefix sums [0, l0, l0 + l1, ...] of segment lengths."""
    out = [0]
    for length in lengths:
        out.append(out[-1] + length)
    return out


def request_lengths(n: int, maxlen: int, seed: int) -> list[tuple[int, int]]:
    """(prompt, output) lengths of the Punica text-generation workload.

    prompt ~ lognormal(sigma=0.8, loc=-1, scale=18) clipped to [1, maxlen - 2]; total ~
    U[0, maxlen); output = total - prompt, at least 1 and at most maxlen - 1 - prompt.
    """
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = int(-1 + 18 * math.exp(0.8 * rng.gauss(0.0, 1.0)))
        prompt = min(max(prompt, 1), maxlen - 2)
        total = rng.randrange(maxlen)
        output = min(max(total - prompt, 1), maxlen - 1 - prompt)
        out.append((prompt, output))
    return out


def adapter_of_requests(mix: str, n: int) -> list[int]:
    """Adapter index of each of n requests (shuffled order is the caller's business)."""
    out: list[int] = []
    for adapter, length in enumerate(segment_lengths(mix, n)):
        out.extend([adapter] * length)
    return out
