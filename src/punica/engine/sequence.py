"""A sequence: one completion being generated (a request with n > 1 has n of them)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from punica.engine.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Token state of one completion. `num_computed` tokens have their KV in the cache.

    Preemption (recompute) sets num_computed to 0 and keeps output_ids: the next prefill covers
    prompt + outputs so far, then decoding continues.
    """

    seq_id: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: SeqStatus = SeqStatus.WAITING
    slot: int = -1
    """Adapter slot while running (-1: base model or not resident)."""
    finish_reason: str | None = None
    logprobs: list[dict[int, float]] = field(default_factory=list)
    """Per output token: {token id: logprob} of the sampled token and the top-k."""
    output_text: str = ""
    tenant: str = ""
    """Whose request this is, for fair scheduling (default: its adapter; "" the base model)."""
    priority: int = 0
    """Lower runs first under the priority policy."""
    queued_at: float = 0.0
    """When it last joined the queue (the scheduler's clock): arrival, or its preemption."""

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
