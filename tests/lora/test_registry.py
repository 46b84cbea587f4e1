"""AdapterRegistry: host-memory LRU of parsed adapters, re-read from disk after eviction."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from punica.errors import AdapterNotFoundError
from punica.lora.registry import AdapterRegistry
from punica.models.arch import load_arch
from punica.models.random import random_adapter
from tests.checkpoints import ADAPTERS, save_adapter, save_model


def test_lru_eviction_and_reload(tmp_path: Path) -> None:
    base = save_model(tmp_path / "m", "llama")
    arch = load_arch(base)
    paths = {n: save_adapter(base, tmp_path / n, i, **ADAPTERS[n])
             for i, n in enumerate(("qv8", "all4rs"))}
    reg = AdapterRegistry(arch, max_rank=16, max_cached=1, allow_pickle=False)
    first = reg.add("qv8", str(paths["qv8"]))
    reg.add("all4rs", str(paths["all4rs"]))
    assert reg.cached() == ["all4rs"]  # qv8 evicted from host memory, still registered
    again = reg.get("qv8")
    assert again is not first and reg.cached() == ["qv8"]
    for key, module in first.modules.items():
        assert torch.equal(module.A, again.modules[key].A)
    reg.add_weights(random_adapter("mem", arch, 4, seed=3))
    assert reg.get("mem").max_rank == 4 and "mem" in reg
    reg.remove("qv8")
    with pytest.raises(AdapterNotFoundError):
        reg.get("qv8")
