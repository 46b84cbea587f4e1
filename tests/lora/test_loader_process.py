"""Adapters read in loader processes (lora/loader_process.py): the same weights as a read in
the engine's process, carved into the shared arena; failures charged to the adapter."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from punica.errors import AdapterLoadError
from punica.lora.loader_process import ProcessReader
from punica.lora.peft import load_adapter
from punica.lora.pinned_arena import PinnedArena
from punica.models.arch import ModelArch, load_arch
from tests.checkpoints import ADAPTERS, save_adapter, save_model

DTYPE = torch.float16  # the pool's: float32 files are cast as they are carved


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[ModelArch, Path, ProcessReader]:
    tmp = tmp_path_factory.mktemp("procs")
    base = save_model(tmp / "m", "llama")
    for i, name in enumerate(("qv8", "all4rs", "mlp16")):
        save_adapter(base, tmp / name, i + 1, **ADAPTERS[name])
    arch = load_arch(base)
    reader = ProcessReader(1, PinnedArena(64 << 20, shared=True), arch, 16, False, DTYPE)
    yield arch, tmp, reader
    reader.close()


def in_arena(t: torch.Tensor, arena: PinnedArena) -> bool:
    return t.untyped_storage().data_ptr() == arena.buffer.untyped_storage().data_ptr()


@pytest.mark.parametrize("name", ["qv8", "all4rs", "mlp16"])
def test_weights_equal_a_read_in_this_process(setup: tuple, name: str) -> None:
    arch, tmp, reader = setup
    want = load_adapter(name, tmp / name, arch, 16, dtype=DTYPE)
    got = reader.load(name, str(tmp / name), None)
    assert got is not None and got.blocks is not None and got.blocks.offsets
    assert list(got.modules) == list(want.modules) and got.stamps == want.stamps
    for key, m in want.modules.items():
        g = got.modules[key]
        assert torch.equal(g.A, m.A) and torch.equal(g.B, m.B) and g.scale == m.scale
        assert in_arena(g.A, reader.arena) and in_arena(g.B, reader.arena)
    assert sorted(got.stacked) == sorted(want.stacked)
    for proj, st in want.stacked.items():
        assert torch.equal(got.stacked[proj].A, st.A) and torch.equal(got.stacked[proj].Bt, st.Bt)
    used = reader.arena.ranges.used
    block = reader.arena.ranges._size[got.blocks.offsets[0]]  # shrunk to what it holds:
    tensors = sum(t.numel() * t.element_size() for m in want.modules.values() for t in (m.A, m.B))
    assert tensors <= block < tensors + 2 * 256 * (len(want.modules) + 1)
    assert block < reader.estimate(tmp / name)
    got.blocks.release()
    assert reader.arena.ranges.used == used - block


def test_a_bad_adapter_fails_with_its_reason_and_frees_its_block(setup: tuple) -> None:
    arch, tmp, reader = setup
    bad = tmp / "bad"
    bad.mkdir(exist_ok=True)
    (bad / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 8}')
    (bad / "adapter_model.safetensors").write_bytes(b"\x10" + bytes(40))
    used = reader.arena.ranges.used
    with pytest.raises(AdapterLoadError, match="corrupt or truncated"):
        reader.load("bad", str(bad), None)
    assert reader.arena.ranges.used == used


def test_a_block_too_small_is_retried_at_the_size_needed(setup: tuple,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    arch, tmp, reader = setup
    monkeypatch.setattr(reader, "estimate", lambda path: 256)
    got = reader.load("qv8", str(tmp / "qv8"), None)
    want = load_adapter("qv8", tmp / "qv8", arch, 16, dtype=DTYPE)
    assert got is not None and all(torch.equal(got.modules[k].A, m.A)
                                   for k, m in want.modules.items())
    got.blocks.release()


def test_a_full_arena_leaves_the_read_to_the_caller(setup: tuple,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    arch, tmp, reader = setup
    monkeypatch.setattr(reader, "estimate", lambda path: 1 << 40)
    assert reader.load("qv8", str(tmp / "qv8"), None) is None


def test_a_process_that_dies_fails_only_its_read(setup: tuple) -> None:
    arch, tmp, reader = setup
    assert reader.load("qv8", str(tmp / "qv8"), None) is not None  # the process is up
    (worker,) = reader._all
    os.kill(worker.process.pid, signal.SIGKILL)
    worker.process.join(10)
    used = reader.arena.ranges.used
    with pytest.raises(AdapterLoadError, match="loader process reading it died"):
        reader.load("all4rs", str(tmp / "all4rs"), None)
    assert reader.arena.ranges.used == used and reader._all[0] is not worker
    got = reader.load("all4rs", str(tmp / "all4rs"), None)  # a new process took its place
    assert got is not None and len(got.modules) == len(
        load_adapter("all4rs", tmp / "all4rs", arch, 16, dtype=DTYPE).modules)
