"""Test setup: without CUDA, Triton kernels run on CPU tensors under Triton's interpreter.

TRITON_INTERPRET must be set before any kernel module is imported (triton.jit reads it when it
decorates), so it is set here, first.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # One intra-op thread per test process: the suite runs one process per core (xdist), and
    # torch's thread pools on top of that oversubscribe the cores (small ops then wait on spinning
    # pool threads; a churn test's probe took 19-46 s instead of 2 s beside another run).
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests run: the GPU when there is one, else the CPU under the interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def _uncapped_cuda_allocator() -> object:
    """An engine sized by gpu_memory_utilization caps the process's CUDA allocator
    (engine/sizing.py `cap_process`); the next test starts without that cap."""
    yield
    if HAS_CUDA:
        torch.cuda.set_per_process_memory_fraction(1.0)
