"""A launched step whose sampled tokens are still on the device, and the placeholders that let
the next step be scheduled and launched before they arrive (SchedulerConfig.async_scheduling).

Overlap, step k:  reserve(k-1) -> schedule k -> launch k (its decode rows' input ids gathered on
the device from k-1's tokens) -> settle k-1 (wait for its tokens, stop checks) -> outputs of k-1.
So the host schedules and launches k while the GPU still runs k-1.

Placeholder life cycle (one per sequence at most, always its last output id):
    reserve: a running sequence sampled in k-1 that cannot finish by length there gets
             PLACEHOLDER appended, so the scheduler gives it its next position in step k
    gather:  step k's row for that position reads k-1's token on the device (build_batch)
    settle:  k-1's token replaces the placeholder (popped, then appended by the stop checks)
A sequence that stops at k-1 (EOS, stop string, abort) may ride along in step k: its row there is
computed and ignored (`settle` skips finished sequences). Its KV blocks and adapter slot, freed
meanwhile, can be handed out in step k+1, which runs after k on the same stream. Penalties need
the previous token on the host: engines with such requests run synchronously.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from punica.engine.sequence import Sequence

PLACEHOLDER = -1


@dataclass
class InFlight:
    seqs: list[Sequence]
    """The sequences that sample in this step, in logits-row order."""
    tokens: torch.Tensor
    """[N] int64 on the device: the sampled tokens."""
    host: torch.Tensor
    """[N] int64 on the host (pinned on CUDA): their copy, complete once `event` has fired
    (-1 for a row whose logits were not finite)."""
    event: torch.cuda.Event | None
    raw_logprobs: torch.Tensor | None
    """[N, vocab] log-softmax when a row asks for logprobs."""

    @classmethod
    def launch(cls, seqs: list[Sequence], tokens: torch.Tensor,
               raw_logprobs: torch.Tensor | None,
               finite: torch.Tensor | None = None) -> InFlight:
        """Start the tokens' copy to the host without waiting for it. `finite` [N] bool: rows
        whose logits were not all finite reach the host as -1 (one copy carries both)."""
        cuda = tokens.is_cuda
        host = torch.empty(tokens.shape, dtype=torch.int64, pin_memory=cuda)
        host.copy_(tokens if finite is None else torch.where(finite, tokens, -1),
                   non_blocking=cuda)
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        return cls(seqs, tokens, host, event, raw_logprobs)

    def wait(self) -> tuple[list[int], list[bool]]:
        """(tokens, whether each row's logits were finite), once the copy is done; a row that
        was not finite has token 0 here (it is failed, never appended)."""
        if self.event is not None:
            self.event.synchronize()
        ids = self.host.tolist()
        return [max(t, 0) for t in ids], [t >= 0 for t in ids]

    def gather_index(self) -> dict[int, int]:
        """seq_id -> row of `tokens`, for the sequences holding a placeholder."""
        return {s.seq_id: i for i, s in enumerate(self.seqs) if has_placeholder(s)}


def has_placeholder(seq: Sequence) -> bool:
    return bool(seq.output_ids) and seq.output_ids[-1] == PLACEHOLDER


def real_output_ids(seq: Sequence) -> list[int]:
    return seq.output_ids[:-1] if has_placeholder(seq) else list(seq.output_ids)
