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


def test_reads_on_loader_threads_are_collected_or_discarded(tmp_path: Path) -> None:
    """ready() starts one read per adapter; collect() caches it; a read whose adapter was
    removed or replaced meanwhile is discarded; a lazily registered folder that fails to read
    is unregistered; the cache keeps within its byte bound (always keeping the newest)."""
    import threading

    from punica.lora.loader import AdapterLoader
    from punica.lora.registry import weights_bytes

    base = save_model(tmp_path / "m", "llama")
    arch = load_arch(base)
    paths = {n: save_adapter(base, tmp_path / n, i, **ADAPTERS[n])
             for i, n in enumerate(("qv8", "all4rs", "mlp16"))}
    gate = threading.Event()
    reg = AdapterRegistry(arch, 16, 8, False, loader=AdapterLoader(2))
    real = reg._read
    reg._read = lambda name, src: (gate.wait(10), real(name, src))[1]
    big = weights_bytes(AdapterRegistry(arch, 16, 1, False).add("x", str(paths["mlp16"])))
    for name in ("qv8", "all4rs", "mlp16"):
        reg.add_lazy(name, str(paths[name]))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("[]")
    reg.add_lazy("bad", str(tmp_path / "bad"))
    assert not any(reg.ready(n) for n in ("qv8", "all4rs", "mlp16", "bad"))
    reg.max_cached_bytes = big + 1  # qv8 alone fits, qv8 and mlp16 together do not
    assert not reg.ready("qv8") and sorted(reg.loading()) == ["all4rs", "bad", "mlp16", "qv8"]
    reg.remove("all4rs")  # removed while read: discarded
    reg.add_lazy("mlp16", str(paths["mlp16"]))  # replaced while read: discarded
    gate.set()
    while reg.loader.num_loading:
        threading.Event().wait(0.01)
    failed = reg.collect()
    assert [n for n, _ in failed] == ["bad"] and "bad" not in reg
    assert reg.cached() == ["qv8"] and reg.ready("qv8") and reg.stats["disk_loads"] == 1
    assert reg.sources["qv8"].stamps  # validated on its first read
    assert not reg.ready("mlp16")  # the replacement is read afresh, in room made for it:
    assert reg.cached() == [] and reg.stats["host_evictions"] == 1  # qv8 went before the read
    while reg.loader.num_loading:
        threading.Event().wait(0.01)
    assert reg.collect() == [] and reg.cached() == ["mlp16"]
    assert reg.stats["host_evictions"] == 1


def test_reads_start_in_room_made_for_them(tmp_path: Path) -> None:
    """With a byte bound, a read starts only when the cache, the reads in flight and its file
    fit (least recently used unwanted entries evicted first); a read that does not fit waits
    until those in flight land, unless none is in flight (it starts, over the bound)."""
    import threading

    from punica.lora.loader import AdapterLoader
    from punica.lora.registry import expected_bytes

    base = save_model(tmp_path / "m", "llama")
    arch = load_arch(base)
    names = ("a", "b", "c", "d")
    for i, n in enumerate(names):
        save_adapter(base, tmp_path / n, i, **ADAPTERS["qv8"])
    gate = threading.Event()
    reg = AdapterRegistry(arch, 16, 8, False, loader=AdapterLoader(2))
    real = reg._read
    reg._read = lambda name, src: (gate.wait(10), real(name, src))[1]
    for n in names:
        reg.add_lazy(n, str(tmp_path / n))
    size = expected_bytes(reg.sources["a"])
    assert size == (tmp_path / "a" / "adapter_model.safetensors").stat().st_size
    reg.max_cached_bytes = 2 * size

    def land() -> None:
        gate.set()
        while reg.loader.num_loading:
            threading.Event().wait(0.01)
        assert reg.collect() == []
        gate.clear()

    assert [reg.ready(n) for n in names] == [False] * 4
    assert sorted(reg.loading()) == ["a", "b"]  # c and d wait for room
    assert not reg.ready("c") and sorted(reg.loading()) == ["a", "b"]
    land()
    assert sorted(reg.cached()) == ["a", "b"] and reg.cached_bytes <= 2 * size
    reg.protected = lambda: {"a"}  # a queued request wants a: b goes to make room for c
    assert not reg.ready("c") and reg.cached() == ["a"] and reg.loading() == ["c"]
    assert not reg.ready("d") and reg.loading() == ["c"]  # a is wanted, c in flight: wait
    land()
    reg.protected = lambda: {"a", "c"}
    assert not reg.ready("d") and reg.loading() == ["d"]  # nothing in flight: over the bound
    land()
    assert reg.cached() == ["a", "c", "d"] and reg.stats["host_evictions"] == 1
    assert reg.stats["disk_loads"] == 4 and reg._reserved_bytes == 0


def test_a_read_for_an_earlier_registration_is_never_credited_to_a_later_one(
        tmp_path: Path) -> None:
    """Unloaded while its read runs, then registered again from other files: the old read is
    discarded and the new registration gets a read of its own."""
    import threading

    from punica.lora.loader import AdapterLoader

    base = save_model(tmp_path / "m", "llama")
    arch = load_arch(base)
    old = save_adapter(base, tmp_path / "old", 1, **ADAPTERS["qv8"])
    new = save_adapter(base, tmp_path / "new", 2, **ADAPTERS["mlp16"])
    gate = threading.Event()
    reg = AdapterRegistry(arch, 16, 8, False, loader=AdapterLoader(2))
    real = reg._read
    reg._read = lambda name, src: (gate.wait(10) if src.path == str(old) else None,
                                   real(name, src))[1]
    reg.add_lazy("x", str(old))
    assert not reg.ready("x")
    reg.remove("x")
    reg.add_lazy("x", str(new))
    assert not reg.ready("x")  # a second read started, for the new files
    while reg.loader.num_loading > 1:
        threading.Event().wait(0.01)
    gate.set()
    while reg.loader.num_loading:
        threading.Event().wait(0.01)
    assert reg.collect() == []
    assert reg.ready("x") and reg.get("x").max_rank == 16  # mlp16's weights, not qv8's
    assert reg.stats["disk_loads"] == 1
