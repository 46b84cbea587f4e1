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
