"""The default SGMV launches compile for sm_90 without register spills (ptxas, offline: no GPU).

A spill puts local-memory traffic on every tile of a bandwidth-bound kernel: the prefetching row
expand with a 64 x 1024 slab spilled 7 KB per thread and ran 10x slower at rank 64 on the H200
(benchmarks/results/lora_op.json). The configs cap their register tiles (lora_config.py); this
checks every default launch of the decode and prefill shapes below. The compiles run in a
subprocess without TRITON_INTERPRET (the tests' kernels are interpreted objects).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from punica.ops.resources import PTXAS

pytestmark = pytest.mark.skipif(not PTXAS.exists(), reason="Triton's bundled ptxas is missing")

DECODE = dict(ranks="8,16,32,64,128", batches="1,8,32,64,128")
PREFILL = dict(ranks="16,128", batches="512")
SLICED = dict(ranks="16,64", batches="1,64,512", slices="4096,4096,4096")  # fused q/k/v
BESIDE = dict(ranks="16", batches="1,8,32,64,128", beside=True)  # add_lora_beside


def report(ranks: str, batches: str, slices: str = "",
           beside: bool = False) -> list[dict[str, object]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "punica.ops.resources", "--json", "--ranks",
                          ranks, "--batches", batches, "--slices", slices]
                         + (["--beside"] if beside else []), env=env,
                         capture_output=True, text=True, check=True, timeout=600).stdout
    return [json.loads(line) | {"sliced": bool(slices), "beside": beside}
            for line in out.splitlines()]


@pytest.fixture(scope="module")
def rows() -> list[dict[str, object]]:
    return report(**DECODE) + report(**PREFILL) + report(**SLICED) + report(**BESIDE)


def test_every_case_compiled_a_shrink_and_an_expand(rows: list[dict[str, object]]) -> None:
    def case_of(r: dict[str, object]) -> tuple[object, ...]:
        return r["rank"], r["batch"], r["mix"], r["sliced"], r["beside"]

    cases = {case_of(r) for r in rows}
    assert len(cases) == 5 * 5 * 2 + 2 * 2 + 2 * 3 * 2 + 5 * 2
    for case in cases:
        kernels = sorted(str(r["kernel"]).split("_")[1] for r in rows if case_of(r) == case)
        assert kernels == ["expand", "shrink"], case


def test_default_launches_do_not_spill(rows: list[dict[str, object]]) -> None:
    spilled = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert spilled == []
    assert all(0 < int(r["registers"]) <= 255 for r in rows)


def test_decode_attention_launches_do_not_spill() -> None:
    """paged_decode unsplit, split with the in-kernel merge (atomics, GPU fence, early return)
    and split with the reduce kernel, at LLaMA-7B's and a GQA shape: each compiles for sm_90
    without spills."""
    code = (
        "import json, torch\n"
        "from dataclasses import asdict\n"
        "from punica.ops.resources import paged_decode_resources\n"
        "for heads, kv in ((32, 32), (32, 8)):\n"
        "    for splits, merge in ((1, True), (4, True), (4, False)):\n"
        "        for r in paged_decode_resources(32, heads, kv, 128, splits, merge, "
        "torch.float16):\n"
        "            print(json.dumps(asdict(r)))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=600).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    kernels = [(r["kernel"], r["constexprs"]["NUM_SPLITS"], r["constexprs"].get("MERGE_IN_KERNEL"))
               for r in rows]
    assert kernels == 2 * [("paged_decode_kernel", 1, False), ("paged_decode_kernel", 4, True),
                           ("paged_decode_kernel", 4, False), ("decode_reduce_kernel", 4, None)]
    assert all(r["constexprs"].get("FENCE", True) for r in rows)
    assert [r for r in rows if r["spill_stores"] or r["spill_loads"]] == []
    assert all(0 < int(r["registers"]) <= 255 for r in rows)
