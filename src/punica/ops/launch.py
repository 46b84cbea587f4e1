"""Cheap repeated launches of a Triton kernel whose launch is fixed but for its tensor arguments.

`kernel[grid](...)` costs tens of microseconds of host time in Triton 3.x: it binds every argument,
specialises each one (dtype, 16-byte alignment, integer divisibility by 16, value 1), builds a
string key of the options, looks the compiled kernel up, then gathers launch metadata and calls
the (empty) launch hooks. An op wrapper that caches its launch per argument signature (`sig` of
each tensor, in a `PlanCache`) knows all of that up front except the tensors' addresses, so
`KernelLaunch` keeps the compiled kernel of the first launch and afterwards calls its launcher
directly, with the addresses as ints (which also skips the launcher's per-pointer driver query;
the plan key already fixed every tensor's device).

Safety: Triton's cache key of a launch is (the specialisation of every argument, the options).
A `KernelLaunch` fixes the grid, every non-tensor argument (integers and floats by value,
constexprs) and the options; its owner's plan key fixes the tensors' dtypes. What is left to vary
is the tensors' 16-byte alignment, so the fast path runs only when every tensor is 16-byte
aligned, with the kernel compiled (by Triton's own path) for exactly that case on this device.
Everything else goes through `kernel[grid]` unchanged: interpreted kernels (TRITON_INTERPRET=1),
a misaligned tensor, a device not seen yet (or not under the active Triton driver), registered
launch hooks (profilers), pre-run hooks, TRITON_DEBUG, Triton instrumentation, or
`FAST_LAUNCH = False`.

Plan keys: a `PlanCache` key is the caller's argument signature (`sig` of every tensor: shapes,
strides, dtypes and devices, so also each device's capability; scalars; configs), and the cache
adds what every plan depends on beyond its arguments (`launch_env`: whether the kernels are
treated as interpreted, `checks.interpreting`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Mapping
from typing import Any, Generic, TypeVar

import torch
from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from punica.ops.checks import interpreting

FAST_LAUNCH = True
"""Direct relaunches on or off, read at every launch: code sets it (tests, and
`scripts/host_overhead.py --no-fast-launch`, to compare with Triton's own path)."""

_INTERPRETER_LOCK = threading.Lock()
"""Triton's interpreter keeps the running launch (its grid, the program id) in module state, so
two threads interpreting kernels at once corrupt each other ("x >= grid_dim[0]"): interpreted
launches take turns. Compiled launches do not need it."""

P = TypeVar("P")
_MISSING: Any = object()


def cdiv(a: int, b: int) -> int:
    """Ceiling division of ints (`triton.cdiv` costs microseconds on the host)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (n >= 1), like `triton.next_power_of_2`."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def sig(t: torch.Tensor | None) -> tuple[object, ...] | None:
    """What the op checks and the kernels' specialisation read of a tensor, as a hashable key
    (all but its address)."""
    if t is None:
        return None
    return (t.shape, t.stride(), t.dtype, t.device)


def launch_env() -> Hashable:
    """What every launch plan depends on beyond its arguments: whether the kernels are treated
    as interpreted (no PDL or GPU fences, bf16 dots upcast, the Triton ops taking CPU tensors).
    Devices and their capability are in each tensor's `sig`."""
    return interpreting()


class PlanCache(Generic[P]):
    """Plans by argument signature and `launch_env()`; cleared when full, so varied shapes cannot
    grow it forever."""

    def __init__(self, max_size: int = 2048) -> None:
        self.plans: dict[Hashable, P] = {}
        self.max_size = max_size

    def get(self, key: Hashable, build: Callable[..., P], *args: Any) -> P:
        """The plan of `key` in the current launch_env(), built by build(*args) (which raises
        on bad arguments) if new."""
        key = (key, launch_env())
        plan = self.plans.get(key, _MISSING)
        if plan is _MISSING:
            if len(self.plans) >= self.max_size:
                self.plans.clear()
            plan = self.plans[key] = build(*args)
        return plan


def _launch_is_plain() -> bool:
    """No launch hooks, debug mode or instrumentation: Triton would launch with no extras."""
    rt = knobs.runtime
    enter, leave = rt.launch_enter_hook, rt.launch_exit_hook
    return not (getattr(enter, "calls", enter) or getattr(leave, "calls", leave) or rt.debug
                or knobs.compilation.instrumentation_mode)


class KernelLaunch:
    """kernel[grid](*tensors, *scalars, **constexprs, **options) with only `tensors` varying.

    The kernel's leading parameters are the tensors (in the order `__call__` receives them),
    then the scalars, then the constexprs (by name).
    """

    __slots__ = ("kernel", "grid", "scalars", "constexprs", "options", "_tail", "_grid3",
                 "_compiled", "_fast")

    def __init__(self, kernel: Any, grid: tuple[int, ...], num_tensors: int,
                 scalars: tuple[object, ...], constexprs: Mapping[str, object],
                 options: Mapping[str, object]) -> None:
        self.kernel, self.grid = kernel, grid
        self.scalars, self.constexprs, self.options = scalars, dict(constexprs), dict(options)
        names = list(kernel.arg_names)
        first_constexpr = num_tensors + len(scalars)
        if sorted(names[first_constexpr:]) != sorted(self.constexprs):
            raise TypeError(f"{names}: expected constexprs {names[first_constexpr:]}, "
                            f"got {sorted(self.constexprs)}")
        self._tail = scalars + tuple(self.constexprs[n] for n in names[first_constexpr:])
        self._grid3 = (grid + (1, 1))[:3]
        # device -> (Triton driver, launcher, function, packed metadata) of the kernel compiled
        # for all-aligned tensors there under that driver (CompiledKernel.run is a property:
        # read once); another active driver (launch_stub's stand-in, or the real one back after
        # it) takes Triton's path again
        self._compiled: dict[int, tuple[Any, Any, Any, Any]] = {}
        self._fast = isinstance(kernel, JITFunction)

    def __call__(self, *tensors: torch.Tensor) -> None:
        if self._compiled and FAST_LAUNCH and _launch_is_plain():
            active = driver.active
            device = active.get_current_device()
            known = self._compiled.get(device)
            kernel = self.kernel
            if known is not None and known[0] is active and not kernel.pre_run_hooks:
                ptrs = [t.data_ptr() for t in tensors]
                bits = 0
                for p in ptrs:
                    bits |= p
                if not bits & 15 and (not kernel.used_global_vals or self._globals_unchanged()):
                    _, run, function, metadata = known
                    g0, g1, g2 = self._grid3
                    # What JITFunction.run passes, less launch metadata and (empty) hooks.
                    run(g0, g1, g2, active.get_current_stream(device), function, metadata,
                        None, None, None, *ptrs, *self._tail)
                    return
        self._launch_slow(tensors)

    def is_fast(self, device: int) -> bool:
        """Whether aligned tensors are launched directly on `device` (its kernel is known under
        the active driver)."""
        known = self._compiled.get(device)
        return known is not None and known[0] is driver.active

    def _launch_slow(self, tensors: tuple[torch.Tensor, ...]) -> None:
        if not self._fast:  # an InterpretedFunction (TRITON_INTERPRET=1)
            with _INTERPRETER_LOCK:
                self.kernel[self.grid](*tensors, *self.scalars, **self.constexprs,
                                       **self.options)
            return
        compiled = self.kernel[self.grid](*tensors, *self.scalars, **self.constexprs,
                                          **self.options)
        if (compiled is not None and _launch_is_plain()
                and all(t.data_ptr() % 16 == 0 for t in tensors)):
            active = driver.active
            self._compiled[active.get_current_device()] = (
                active, compiled.run, compiled.function, compiled.packed_metadata)

    def _globals_unchanged(self) -> bool:
        """Triton's own guard: globals the kernel read at compile time still hold their value."""
        missing = object()
        for (name, _), (value, scope) in self.kernel.used_global_vals.items():
            if scope.get(name, missing) != value:
                return False  # the slow path raises Triton's error
        return True
