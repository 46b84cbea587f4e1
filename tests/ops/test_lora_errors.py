"""Bad arguments to the SGMV ops raise ValueError naming the argument and the expected value."""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import pytest
import torch

from punica.ops import lora

T, IN, OUT, SLOTS, R = 5, 32, 24, 3, 16


def good_args(device: torch.device) -> dict[str, torch.Tensor]:
    i32 = dict(dtype=torch.int32, device=device)
    return dict(
        x=torch.randn(T, IN, device=device, dtype=torch.float16),
        A=torch.randn(SLOTS, R, IN, device=device, dtype=torch.float16),
        B=torch.randn(SLOTS, R, OUT, device=device, dtype=torch.float16),
        y=torch.randn(T, OUT, device=device, dtype=torch.float16),
        v=torch.zeros(lora.shrink_config(T, 2, IN, R).num_splits, T, R, device=device),
        indptr=torch.tensor([0, 2, 5], **i32),
        slots=torch.tensor([1, -1], **i32),
        ranks=torch.tensor([16, 8, 4], **i32),
        scales=torch.ones(SLOTS, device=device),
    )


def shrink(a: dict[str, torch.Tensor]) -> None:
    lora.sgmv_shrink(a["x"], a["A"], a["indptr"], a["slots"], a["ranks"], a["v"],
                     check_values=True)


def expand(a: dict[str, torch.Tensor]) -> None:
    lora.sgmv_expand(a["v"], a["B"], a["indptr"], a["slots"], a["ranks"], a["scales"], a["y"],
                     check_values=True)


Mutate = Callable[[dict[str, torch.Tensor]], None]

SHRINK_CASES: list[tuple[str, Mutate, str]] = [
    ("x 1-D", lambda a: a.update(x=a["x"][0]), "x"),
    ("x int", lambda a: a.update(x=a["x"].int()), "x.dtype"),
    ("x strided cols", lambda a: a.update(x=a["x"].repeat(1, 2)[:, ::2]), "x.stride(1)"),
    ("A wrong in", lambda a: a.update(A=a["A"][:, :, :-1].contiguous()), "A_pool.shape[2]"),
    ("A dtype", lambda a: a.update(A=a["A"].float()), "A_pool.dtype"),
    ("A not contiguous", lambda a: a.update(A=a["A"].transpose(0, 1)), "A_pool"),
    ("A 2-D", lambda a: a.update(A=a["A"][0]), "A_pool"),
    ("indptr int64", lambda a: a.update(indptr=a["indptr"].long()), "indptr.dtype"),
    ("indptr length", lambda a: a.update(indptr=a["indptr"][:2]), "indptr.numel()"),
    ("slots float", lambda a: a.update(slots=a["slots"].float()), "slots.dtype"),
    ("ranks length", lambda a: a.update(ranks=a["ranks"][:2]), "ranks.numel()"),
    ("slot out of range", lambda a: a["slots"].fill_(SLOTS), "slots"),
    ("slot below -1", lambda a: a["slots"].fill_(-2), "slots"),
    ("rank above pool", lambda a: a["ranks"].__setitem__(0, R + 1), "ranks"),
    ("negative rank", lambda a: a["ranks"].__setitem__(2, -1), "ranks"),
    ("indptr decreasing", lambda a: a["indptr"].copy_(torch.tensor([0, 4, 3])), "indptr"),
    ("indptr past T", lambda a: a["indptr"].__setitem__(2, T + 1), "indptr[-1]"),
    ("indptr start", lambda a: a["indptr"].__setitem__(0, 1), "indptr[0]"),
    ("v fp16", lambda a: a.update(v=a["v"].half()), "v.dtype"),
    ("v wrong rank dim", lambda a: a.update(v=a["v"][:, :, :8].contiguous()), "v.shape[1:]"),
    ("v wrong splits", lambda a: a.update(v=a["v"].repeat(2, 1, 1)), "v.shape[0]"),
]

EXPAND_CASES: list[tuple[str, Mutate, str]] = [
    ("y 3-D", lambda a: a.update(y=a["y"][None]), "y"),
    ("y strided cols", lambda a: a.update(y=a["y"].repeat(1, 2)[:, ::2]), "y.stride(1)"),
    ("B wrong out", lambda a: a.update(B=a["B"][:, :, :-1].contiguous()), "B_pool.shape[2]"),
    ("B wrong rank", lambda a: a.update(B=a["B"][:, :8].contiguous()), "v.shape[1:]"),
    ("B dtype", lambda a: a.update(B=a["B"].bfloat16()), "B_pool.dtype"),
    ("scales fp16", lambda a: a.update(scales=a["scales"].half()), "scales.dtype"),
    ("scales length", lambda a: a.update(scales=a["scales"][:1]), "scales.numel()"),
    ("v rows", lambda a: a.update(v=a["v"][:, :-1].contiguous()), "v.shape[1:]"),
    ("rank above pool", lambda a: a["ranks"].__setitem__(1, R + 5), "ranks"),
]


@pytest.mark.parametrize("op,mutate,name", [(shrink, m, n) for _, m, n in SHRINK_CASES]
                         + [(expand, m, n) for _, m, n in EXPAND_CASES],
                         ids=[c[0] for c in SHRINK_CASES] + [c[0] for c in EXPAND_CASES])
def test_bad_argument_raises_value_error(device: torch.device, op: Callable, mutate: Mutate,
                                        name: str) -> None:
    args = good_args(device)
    op(args)  # the unmodified call is accepted
    mutate(args)
    with pytest.raises(ValueError, match=rf"^{re.escape(name)}: expected .*, got "):
        op(args)


def test_device_mismatch_is_named(device: torch.device) -> None:
    args = good_args(device)
    args["A"] = args["A"].to("meta")
    with pytest.raises(ValueError, match=rf"^A_pool.device: expected {device}"):
        shrink(args)


def test_add_lora_requires_workspace_off_cpu_path() -> None:
    args = good_args(torch.device("cpu"))
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("on CPU without the interpreter add_lora runs the reference, no workspace")
    with pytest.raises(ValueError, match="^workspace: "):
        lora.add_lora(args["y"], args["x"], args["A"], args["B"], args["indptr"], args["slots"],
                      args["ranks"], args["scales"])
    small = torch.empty(1)
    with pytest.raises(ValueError, match=r"^workspace.numel\(\): expected >= "):
        lora.add_lora(args["y"], args["x"], args["A"], args["B"], args["indptr"], args["slots"],
                      args["ranks"], args["scales"], small)


def test_expand_rank_block_below_max_rank_is_refused(device: torch.device) -> None:
    a = good_args(device)
    B = torch.randn(SLOTS, 32, OUT, device=device, dtype=torch.float16)
    v = torch.zeros(a["v"].shape[0], T, 32, device=device)
    with pytest.raises(ValueError, match=r"^config.block_r: expected >= max_rank \(32\), got 16"):
        lora.sgmv_expand(v, B, a["indptr"], a["slots"], a["ranks"], a["scales"],
                         a["y"], lora.ExpandConfig(block_m=16, block_n=32, block_r=16))
