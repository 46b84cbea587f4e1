"""A stand-in Triton driver under which `kernel[grid](...)` runs its whole host path (binding,
specialisation, cache lookup, launcher call) but compiles and launches nothing.

For measuring the wrappers' host time without a GPU (`scripts/host_overhead.py`) and for testing
`launch.KernelLaunch` against Triton's own launch path on CPU.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction


class NullKernel:
    """What Triton's JIT cache holds after a compile, minus the binary. `run` is the launcher:
    it counts the launch and keeps its arguments."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.function = None
        self.packed_metadata = (4, 1, 0)
        self.launches = 0
        self.last_args: tuple[Any, ...] = ()

    def launch_metadata(self, grid: object, stream: object, *args: object) -> None:
        return None

    def run(self, *args: Any) -> None:
        self.launches += 1
        self.last_args = args


class NullDriver:
    """Device 0 (or `device`), stream 0, an sm_90 target: enough for JITFunction.run."""

    def __init__(self, device: int = 0) -> None:
        self.device = device
        self.target = GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return self.device

    def get_current_stream(self, device: int) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target


def null_kernels(kernel: JITFunction) -> list[NullKernel]:
    """The NullKernels `kernel` 'compiled' so far, on every device."""
    return [k for caches in kernel.device_caches.values() for k in caches[0].values()
            if isinstance(k, NullKernel)]


@contextmanager
def null_launches(kernels: Iterable[JITFunction],
                  null_driver: NullDriver | None = None) -> Iterator[NullDriver]:
    """Within: the active driver is a NullDriver and each kernel compiles to a NullKernel.
    After: the previous driver is back and the kernels' caches are empty."""
    kernels = list({id(k): k for k in kernels}.values())
    saved = driver._active  # DriverConfig has no getter that leaves an unset driver unset
    stand_in = null_driver or NullDriver()
    driver.set_active(stand_in)
    for kernel in kernels:
        kernel._do_compile = _compile_null(kernel)
    try:
        yield stand_in
    finally:
        for kernel in kernels:
            del kernel._do_compile
            kernel.device_caches.clear()
        driver._active = saved


def _compile_null(kernel: JITFunction) -> Any:
    def compile_null(key: str, signature: object, device: int, constexprs: object,
                     options: object, attrs: object, warmup: bool) -> NullKernel:
        null = NullKernel(key)
        kernel.device_caches[device][0][key] = null
        return null

    return compile_null
