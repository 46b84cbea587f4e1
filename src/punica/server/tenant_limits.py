"""Per-tenant rate limits of the server: tokens per minute over a sliding window. Plain Python,
one instance per server, used on its event loop only (no lock).

A request is charged what it may cost when it is admitted: its prompt tokens and max_tokens for
each of its completions. A tenant whose last 60 seconds of charges plus this request pass its
limit gets 429, with Retry-After the seconds until enough of those charges leave the window; a
request larger than the whole limit gets 400 (it could never pass). Tenants with nothing in the
window are forgotten, so the state stays as small as the set of recent tenants.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

from punica.errors import RateLimitedError, RequestTooLargeError

WINDOW_S = 60.0
SWEEP_EVERY = 256
"""Every this many charges, every tenant's window is expired (not only the charged one's)."""


class TokenWindows:
    def __init__(self, tokens_per_minute: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if tokens_per_minute < 1:
            raise ValueError(f"tokens_per_minute: expected >= 1, got {tokens_per_minute}")
        self.limit, self.clock = tokens_per_minute, clock
        self._charges: dict[str, deque[tuple[float, int]]] = {}
        self._sums: dict[str, int] = {}
        self._count = 0

    def used(self, tenant: str) -> int:
        self._expire(tenant, self.clock())
        return self._sums.get(tenant, 0)

    def charge(self, tenant: str, tokens: int) -> None:
        """Admit `tokens` for `tenant` now, or raise RateLimitedError / RequestTooLargeError."""
        if tokens > self.limit:
            raise RequestTooLargeError(
                f"this request may use {tokens} tokens (its prompt and max_tokens for each "
                f"completion), more than its tenant's limit of {self.limit} tokens per minute; "
                "ask for fewer max_tokens")
        now = self.clock()
        self._expire(tenant, now)
        used = self._sums.get(tenant, 0)
        if used + tokens > self.limit:
            raise RateLimitedError(
                f"tenant {tenant or 'base'!r} is past its limit of {self.limit} tokens per "
                f"minute ({used} in the last minute, {tokens} asked)",
                self._wait(tenant, now, used + tokens - self.limit))
        self._charges.setdefault(tenant, deque()).append((now, tokens))
        self._sums[tenant] = used + tokens
        self._count += 1
        if self._count % SWEEP_EVERY == 0:  # tenants that did not come back
            for t in list(self._charges):
                self._expire(t, now)

    def refund(self, tenant: str, tokens: int) -> None:
        """Take back the charge just made for a request that was then refused."""
        charges = self._charges.get(tenant)
        if charges and charges[-1][1] == tokens:
            charges.pop()
            self._sums[tenant] -= tokens
            if not charges:
                del self._charges[tenant], self._sums[tenant]

    def _wait(self, tenant: str, now: float, excess: int) -> int:
        """Whole seconds until `excess` tokens of charges have left the window."""
        freed = 0
        for t, tokens in self._charges[tenant]:
            freed += tokens
            if freed >= excess:
                return max(1, math.ceil(t + WINDOW_S - now))
        return math.ceil(WINDOW_S)

    def _expire(self, tenant: str, now: float) -> None:
        charges = self._charges.get(tenant)
        if charges is None:
            return
        while charges and charges[0][0] <= now - WINDOW_S:
            self._sums[tenant] -= charges.popleft()[1]
        if not charges:
            del self._charges[tenant], self._sums[tenant]
