"""The direct relaunch (`launch.KernelLaunch`) against Triton's own launch path, on CPU.

Triton's host path runs for real under `launch_stub.null_launches` (a stand-in driver whose
compiled kernels record what their launcher received), so the fast path can be compared with
what `kernel[grid](...)` passes for the same tensors.
"""

from __future__ import annotations

import threading

import pytest
import torch
import triton
import triton.language as tl
from triton import knobs
from triton._C.libtriton import native_specialize_impl
from triton.backends.nvidia.compiler import CUDABackend
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from punica.ops import checks, launch
from punica.ops.launch import KernelLaunch, PlanCache, cdiv, next_power_of_2
from punica.ops.launch_stub import NullKernel, null_kernels, null_launches

GRID = (3, 2)
BASE = 9  # launcher arguments before the kernel's: grid x3, stream, function, metadata, hooks


def _toy(x_ptr, y_ptr, n, stride, BLOCK: tl.constexpr, FLAG: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs * stride, tl.load(x_ptr + offs) + n)


@pytest.fixture
def toy() -> JITFunction:
    return JITFunction(_toy)  # compiled-kernel object even under TRITON_INTERPRET=1


def toy_launch(kernel: object, n: int = 5) -> KernelLaunch:
    return KernelLaunch(kernel, GRID, 2, (n, 1), {"BLOCK": 16, "FLAG": True}, {"num_warps": 4})


def tensors(offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(64)[offset:offset + 16], torch.zeros(16)


def only_kernel(kernel: JITFunction) -> NullKernel:
    (null,) = null_kernels(kernel)
    return null


def test_int_helpers_match_triton() -> None:
    for n in range(1, 5000):
        assert next_power_of_2(n) == triton.next_power_of_2(n)
    for a in range(0, 200):
        for b in range(1, 40):
            assert cdiv(a, b) == triton.cdiv(a, b)


def test_tensor_specialisation_is_dtype_and_alignment() -> None:
    """The fast path's premise: Triton specialises a tensor on its dtype and 16-byte alignment
    alone (not its shape, strides or offset otherwise)."""
    base = torch.zeros(4096, dtype=torch.uint8)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.int32, torch.int64):
        plain = native_specialize_impl(CUDABackend, torch.zeros(1, dtype=dtype), False, True, True)
        size = torch.empty(0, dtype=dtype).element_size()
        for offset in (0, size, 2 * size, 16, 48, 256):
            flat = base[offset: offset + 1024].view(dtype)
            for t in (flat, flat.view(4, -1), flat.view(4, -1).t(), flat[::2], flat[:0]):
                spec = native_specialize_impl(CUDABackend, t, False, True, True)
                assert spec == (plain[0], "D" if t.data_ptr() % 16 == 0 else "")


def test_fast_launch_passes_what_triton_passes(toy: JITFunction) -> None:
    with null_launches([toy]):
        run = toy_launch(toy)
        run(*tensors())  # Triton's path: compiles, launches, and the launch keeps the kernel
        null = only_kernel(toy)
        assert null.launches == 1 and run.is_fast(0)
        x, y = tensors()
        run(x, y)
        fast_args = null.last_args
        toy[GRID](x, y, 5, 1, BLOCK=16, FLAG=True, num_warps=4)
        triton_args = null.last_args
    assert null.launches == 3 and fast_args != triton_args
    assert fast_args[:6] == triton_args[:6] and fast_args[6:BASE] == (None, None, None)
    assert fast_args[BASE:] == (x.data_ptr(), y.data_ptr(), 5, 1, 16, True)
    assert triton_args[BASE:] == (x, y, 5, 1, 16, True)


def test_misaligned_tensor_takes_triton_path(toy: JITFunction) -> None:
    with null_launches([toy]):
        run = toy_launch(toy)
        run(*tensors())
        first = only_kernel(toy)
        x, y = tensors(offset=1)  # 4 bytes past a 16-byte boundary: Triton specialises anew
        run(x, y)
        (second,) = [k for k in null_kernels(toy) if k is not first]
        assert second.key != first.key
        assert second.last_args[BASE] is x and second.last_args[BASE + 1] is y
        aligned = tensors()
        run(*aligned)  # aligned again: the first kernel, launched directly
        assert first.launches == 2 and first.last_args[BASE] == aligned[0].data_ptr()


@pytest.mark.parametrize("disable", ["hook", "switch", "debug", "pre_run_hook"])
def test_fast_path_yields_to_triton(toy: JITFunction, disable: str,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Launch hooks (profilers), TRITON_DEBUG, pre-run hooks or the module switch: every launch
    goes through kernel[grid], which passes the tensors themselves."""
    seen: list[object] = []

    def hook(*args: object, **kwargs: object) -> None:
        seen.append(args[0] if args else kwargs)

    with null_launches([toy]):
        run = toy_launch(toy)
        run(*tensors())
        if disable == "hook":
            knobs.runtime.launch_enter_hook.add(hook)
        elif disable == "switch":
            monkeypatch.setattr(launch, "FAST_LAUNCH", False)
        elif disable == "debug":
            monkeypatch.setattr(knobs.runtime, "debug", True)
        else:
            toy.pre_run_hooks.append(hook)
        try:
            x, y = tensors()
            run(x, y)
        finally:
            knobs.runtime.launch_enter_hook.remove(hook)
            toy.pre_run_hooks.clear()
        launched = [k.last_args for k in null_kernels(toy) if k.last_args[BASE] is x]
    assert len(launched) == 1 and launched[0][BASE + 1] is y
    assert launched[0][BASE + 2:] == (5, 1, 16, True)
    if disable == "hook":
        assert launched[0][7] is knobs.runtime.launch_enter_hook
    if disable == "pre_run_hook":
        assert seen == [x]


def test_new_device_takes_triton_path(toy: JITFunction) -> None:
    with null_launches([toy]) as stand_in:
        run = toy_launch(toy)
        run(*tensors())
        stand_in.device = 1
        assert not run.is_fast(1)
        x, y = tensors()
        run(x, y)
        assert toy.device_caches[1][0] and run.is_fast(1)
        (on_one,) = toy.device_caches[1][0].values()
        assert on_one.last_args[BASE] is x and on_one.last_args[BASE + 1] is y


def test_interpreted_kernel_always_runs_the_interpreter() -> None:
    interpreted = InterpretedFunction(_toy)
    for n in (3, 7):
        run = toy_launch(interpreted, n)
        for _ in range(2):
            x, y = torch.arange(16.0), torch.zeros(16)
            run(x, y)
            assert torch.equal(y, x + n)
        assert not run.is_fast(0)


def _program_ids(y_ptr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + pid * BLOCK + offs, offs * 0 + pid * tl.num_programs(0))


def test_interpreted_launches_from_threads_take_turns() -> None:
    # the interpreter keeps the running grid in module state: two engines' threads launching at
    # once used to fail ("x >= grid_dim[0]") or write another launch's program ids
    kernel = InterpretedFunction(_program_ids)
    failures: list[str] = []

    def work(programs: int) -> None:
        run = KernelLaunch(kernel, (programs,), 1, (), {"BLOCK": 4}, {})
        for _ in range(30):
            y = torch.full((programs, 4), -1, dtype=torch.int32)
            try:
                run(y)
            except Exception as e:  # noqa: BLE001 - reported below
                failures.append(repr(e))
                return
            want = (torch.arange(programs, dtype=torch.int32) * programs)[:, None].expand(-1, 4)
            if not torch.equal(y, want):
                failures.append(f"grid {programs}: {y[:, 0].tolist()}")
                return

    threads = [threading.Thread(target=work, args=(n,)) for n in (3, 17, 29, 64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_constexprs_must_name_the_remaining_parameters(toy: JITFunction) -> None:
    with pytest.raises(TypeError, match="expected constexprs"):
        KernelLaunch(toy, GRID, 2, (5, 1), {"BLOCK": 16}, {})
    with pytest.raises(TypeError, match="expected constexprs"):
        KernelLaunch(toy, GRID, 2, (5,), {"BLOCK": 16, "FLAG": True}, {})


def test_plan_cache_builds_once_and_stays_bounded() -> None:
    built: list[int] = []

    def build(k: int) -> str:
        built.append(k)
        return f"plan {k}"

    cache: PlanCache[str] = PlanCache(max_size=2)
    assert cache.get(1, build, 1) == cache.get(1, build, 1) == "plan 1"
    assert built == [1]
    cache.get(2, build, 2)
    cache.get(3, build, 3)
    assert len(cache.plans) <= 2 and cache.get(3, build, 3) == "plan 3" and built == [1, 2, 3]

    def failing(k: int) -> str:
        raise ValueError(f"bad {k}")

    for _ in range(2):  # a failed build is not remembered
        with pytest.raises(ValueError, match="bad 4"):
            cache.get(4, failing, 4)


def test_plan_cache_keys_hold_the_interpreter_setting() -> None:
    """A plan made with the kernels treated as interpreted (no PDL or fences, CPU tensors taken)
    is never reused with them compiled, nor the other way round."""
    built: list[bool] = []

    def build() -> int:
        built.append(checks.interpreting())
        return len(built)

    cache: PlanCache[int] = PlanCache()
    with checks.use_interpreter(True):
        on = cache.get("same signature", build)
    with checks.use_interpreter(False):
        off = cache.get("same signature", build)
        assert cache.get("same signature", build) == off
    with checks.use_interpreter(True):
        assert cache.get("same signature", build) == on
    assert (on, off) == (1, 2) and built == [True, False]


def test_another_driver_takes_triton_path(toy: JITFunction) -> None:
    """A kernel known under one Triton driver is not launched directly under another (here two
    stand-ins; in a script, the real driver back after launch_stub's)."""
    run = toy_launch(toy)
    with null_launches([toy]):
        run(*tensors())
        first = only_kernel(toy)
        assert run.is_fast(0)
    with null_launches([toy]):
        assert not run.is_fast(0)
        x, y = tensors()
        run(x, y)
        second = only_kernel(toy)
        assert second is not first and second.last_args[BASE] is x
        run(*tensors())
        assert second.launches == 2 and run.is_fast(0)
    assert first.launches == 1
