"""A thread's scratch buffer for adapter files: reused, bounded, never aliased by results."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from punica.lora import read_buffer
from punica.lora.read_buffer import assert_not_in_scratch, scratch, use_scratch


def test_scratch_is_reused_grown_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(read_buffer, "MAX_SCRATCH_BYTES", 1000)
    use_scratch()
    a = scratch(100)
    b = scratch(50)
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    assert (a.numel(), b.numel()) == (100, 50)
    c = scratch(400)  # grown: a new buffer, kept for the next reads
    assert c.numel() == 400 and scratch(300).data_ptr() == c.data_ptr()
    big = scratch(1001)  # past the bound: memory of its own, not kept
    assert big.untyped_storage().data_ptr() != c.untyped_storage().data_ptr()
    assert scratch(10).data_ptr() == c.data_ptr()
    other: list[int] = []

    def opted_in() -> None:
        use_scratch()
        other.extend(scratch(10).data_ptr() for _ in range(2))

    t = threading.Thread(target=opted_in)
    t.start()
    t.join()
    assert other[0] == other[1] != c.data_ptr()  # each thread has its own


def test_a_thread_that_did_not_opt_in_keeps_no_buffer() -> None:
    seen: list[bool] = []

    def read() -> None:
        a, b = scratch(64), scratch(64)
        seen.append(a.data_ptr() != b.data_ptr() and not hasattr(read_buffer._local, "buf"))

    t = threading.Thread(target=read)
    t.start()
    t.join()
    assert seen == [True]


def test_a_result_in_the_scratch_buffer_is_refused() -> None:
    use_scratch()
    view = scratch(64)[8:24].view(torch.float16)
    with pytest.raises(AssertionError, match="aliases"):
        assert_not_in_scratch([torch.zeros(3), view])
    assert_not_in_scratch([torch.zeros(3), view.clone()])


def test_adapters_read_through_the_scratch_buffer_own_their_weights(tmp_path: Path) -> None:
    """Two adapters read one after the other on one thread: the first's weights are unchanged
    by the second read (which reused the buffer)."""
    from punica.lora.peft import load_adapter
    from punica.models.arch import load_arch
    from tests.checkpoints import ADAPTERS, save_adapter, save_model

    use_scratch()  # as a loader thread does: both reads go through one buffer
    base = save_model(tmp_path / "m", "llama")
    arch = load_arch(base)
    one = load_adapter("one", save_adapter(base, tmp_path / "one", 1, **ADAPTERS["qv8"]), arch, 16)
    kept = {k: (m.A.clone(), m.B.clone()) for k, m in one.modules.items()}
    load_adapter("two", save_adapter(base, tmp_path / "two", 2, **ADAPTERS["qv8"]), arch, 16)
    for k, m in one.modules.items():
        assert torch.equal(m.A, kept[k][0]) and torch.equal(m.B, kept[k][1])
