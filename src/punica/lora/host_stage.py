"""Host copies of adapter weights in the form a pool slot takes: A [r, in] as is, B transposed
to [r, out], both contiguous and, on a CUDA pool, in pinned memory, so that filling a slot is a
set of asynchronous DMA copies queued before the step that reads it (the host does not wait).

Modules read from files are in that form already (`staged.to_pool_form`, on a loader thread) and
pass through untouched. Life cycle of a staged module (weights built in memory): made at its
first load into any slot (the one host cost: pinning and transposing), reused by every later
load of that module (modules shared by many adapters are staged once), dropped least recently
used once the stage holds more than `max_bytes`. A dropped
pinned buffer may still be read by a copy in flight: torch's pinned-memory allocator reuses a
block only after the copies queued from it have finished, so dropping needs no wait here.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from punica.lora.peft import ModuleLora


class HostStage:
    def __init__(self, max_bytes: int, pin: bool) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes: expected >= 0, got {max_bytes}")
        self.max_bytes, self.pin = max_bytes, pin
        self.bytes = 0
        # id(module) -> (module, A, B^T); the module is held so that its id stays its own
        self._entries: OrderedDict[int, tuple[ModuleLora, torch.Tensor, torch.Tensor]] = \
            OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, module: ModuleLora, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, in], B^T [r, out]) of `module` in `dtype`, contiguous (pinned if `pin`)."""
        a, bt = module.A, module.B.T
        if all(t.dtype == dtype and t.is_contiguous() for t in (a, bt)):
            return a, bt  # in pool form already (read by a loader: `staged.to_pool_form`;
            # pageable past the end of the pinned arena: not pinned here on the engine thread)
        key = id(module)
        entry = self._entries.get(key)
        if entry is not None and entry[1].dtype == dtype:
            self._entries.move_to_end(key)
            return entry[1], entry[2]
        a, bt = self._host(module.A, dtype), self._host(module.B.T, dtype)
        if entry is not None:
            self._drop(key)
        self._entries[key] = (module, a, bt)
        self.bytes += _nbytes(a) + _nbytes(bt)
        while self.bytes > self.max_bytes and len(self._entries) > 1:
            self._drop(next(iter(self._entries)))
        return a, bt

    def _host(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(t.shape, dtype=dtype, pin_memory=self.pin)
        out.copy_(t)
        return out

    def _drop(self, key: int) -> None:
        _, a, bt = self._entries.pop(key)
        self.bytes -= _nbytes(a) + _nbytes(bt)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
