"""Paged attention kernels vs the torch reference: dtypes x GQA groups x block sizes x mixes of
prefill chunks and decode rows, on scattered blocks; outputs poisoned (NaN) first.

On CPU the kernels run under Triton's interpreter (small sizes); on a GPU natively, plus real
LLaMA-shaped sizes in the gpu-marked tests.
"""

from __future__ import annotations

import pytest
import torch

from punica.ops import attention as attn
from punica.ops import fused_ref
from punica.ops.attention_ref import paged_attention_ref, write_kv
from tests.ops.lora_cases import rel_err, seed_of

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_case(gen: torch.Generator, device: torch.device, dtype: torch.dtype,
              contexts: list[int], new_tokens: list[int], heads: int, kv_heads: int,
              head_dim: int, block_size: int) -> dict:
    """Random caches over shuffled blocks; sequence b has contexts[b] tokens, the last
    new_tokens[b] of which are its query rows."""
    blocks_per = [-(-c // block_size) for c in contexts]
    num_blocks = sum(blocks_per) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, i = [], 0
    for n in blocks_per:
        tables.append(perm[i: i + n])
        i += n
    width = max(blocks_per)
    padded = [t + [0] * (width - len(t)) for t in tables]

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype).to(device)

    cu = [0]
    for n in new_tokens:
        cu.append(cu[-1] + n)
    i32 = dict(dtype=torch.int32, device=device)
    return dict(
        q=randn(cu[-1], heads, head_dim), k_cache=randn(num_blocks, block_size, kv_heads, head_dim),
        v_cache=randn(num_blocks, block_size, kv_heads, head_dim), cu=cu, contexts=contexts,
        tables=tables, cu_t=torch.tensor(cu, **i32), seq_lens_t=torch.tensor(contexts, **i32),
        tables_t=torch.tensor(padded, **i32), scale=head_dim**-0.5)


def reference(c: dict) -> torch.Tensor:
    return paged_attention_ref(c["q"].cpu(), c["k_cache"].cpu(), c["v_cache"].cpu(), c["cu"],
                               c["contexts"], c["tables"], c["scale"])


MIXES = {
    "prefill": ([9, 17, 5], [9, 17, 5]),
    "chunks": ([20, 7, 33], [6, 7, 1]),  # later chunks of prompts, a decode row
    "decode_like": ([3, 40, 1, 18], [1, 1, 1, 1]),
}


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (8, 1)])
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
def test_prefill_matches_reference(device: torch.device, dtype: torch.dtype, heads: int,
                                   kv_heads: int, mix: str) -> None:
    gen = torch.Generator().manual_seed(seed_of(dtype, heads, kv_heads, mix))
    contexts, new = MIXES[mix]
    c = make_case(gen, device, dtype, contexts, new, heads, kv_heads, 16, 4)
    out = torch.full_like(c["q"], float("nan"))
    attn.paged_prefill(c["q"], c["k_cache"], c["v_cache"], c["cu_t"], c["seq_lens_t"],
                       c["tables_t"], c["scale"], out, block_m=16, block_n=16)
    assert not torch.isnan(out).any()
    assert rel_err(out, reference(c)) <= TOL[dtype]


@pytest.mark.parametrize("splits,merge_in_kernel", [(1, True), (2, False), (3, False),
                                                    (2, True), (3, True)])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 16), (4, 2, 32), (8, 1, 24)])
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
def test_decode_matches_reference(device: torch.device, dtype: torch.dtype, heads: int,
                                  kv_heads: int, head_dim: int, splits: int,
                                  merge_in_kernel: bool) -> None:
    """Contexts of one split and of several (split length 32 or 22 -> 32 at block_n 16), the
    workspace poisoned; the in-kernel merge leaves its counters at 0 for the next launch."""
    gen = torch.Generator().manual_seed(seed_of(dtype, heads, kv_heads, splits, merge_in_kernel))
    contexts = [1, 37, 8, 64, 15]
    c = make_case(gen, device, dtype, contexts, [1] * 5, heads, kv_heads, head_dim, 8)
    ws = attn.DecodeWorkspace.allocate(8, heads, head_dim, splits, device) if splits > 1 else None
    if ws is not None:
        ws.part_out.fill_(float("nan"))
        ws.part_lse.fill_(float("nan"))
    for _ in range(2):  # the second launch reuses the counters the first one left
        out = torch.full_like(c["q"], float("nan"))
        attn.paged_decode(c["q"], c["k_cache"], c["v_cache"], c["seq_lens_t"], c["tables_t"],
                          c["scale"], out, max_context=64, workspace=ws, block_n=16,
                          merge_in_kernel=merge_in_kernel)
        assert not torch.isnan(out).any()
        assert rel_err(out, reference(c)) <= TOL[dtype]
    if ws is not None:
        assert int(ws.counters.abs().sum()) == 0


def test_decode_rejects_a_bad_workspace(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(5)
    c = make_case(gen, device, torch.float32, [3, 9], [1, 1], 4, 2, 16, 8)
    ws = attn.DecodeWorkspace.allocate(8, 4, 16, 2, device)
    bad = attn.DecodeWorkspace(ws.part_out, ws.part_lse, ws.counters.to(torch.int64))
    with pytest.raises(ValueError, match="workspace.counters"):
        attn.paged_decode(c["q"], c["k_cache"], c["v_cache"], c["seq_lens_t"], c["tables_t"],
                          c["scale"], torch.empty_like(c["q"]), max_context=16, workspace=bad)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_write_kv_cache_matches_reference(device: torch.device, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(6, 2, 16, generator=gen).to(dtype).to(device)
    v = torch.randn(6, 2, 16, generator=gen).to(dtype).to(device)
    caches = [torch.randn(4, 4, 2, 16, generator=gen).to(dtype).to(device) for _ in range(2)]
    expected = [c.clone() for c in caches]
    slots = torch.tensor([5, 0, 15, -1, 9, 2], device=device)
    keep = slots >= 0
    write_kv(expected[0], expected[1], k[keep], v[keep], slots[keep])
    attn.write_kv_cache(k, v, caches[0], caches[1], slots)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 16), (8, 2, 32), (12, 1, 8)])
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16), ids=str)
def test_rotary_write_kv_cache_matches_reference(device: torch.device, dtype: torch.dtype,
                                                 heads: int, kv_heads: int,
                                                 head_dim: int) -> None:
    """One launch = fused.rotary_ on q and on k, then write_kv of the rotated k and of v; q and
    k are column slices of one fused q/k/v output (as in the model), the cache poisoned."""
    gen = torch.Generator().manual_seed(seed_of("rotary-write", dtype, heads, kv_heads))
    T, max_len = 7, 64
    qkv = torch.randn(T, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype).to(device)
    q = qkv[:, :heads * head_dim].view(T, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(T, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim:].view(T, kv_heads, head_dim)
    angles = torch.rand(max_len, head_dim // 2, generator=gen) * 6.3
    cos = torch.cat([angles.cos(), angles.cos()], 1).to(device)
    sin = torch.cat([angles.sin(), angles.sin()], 1).to(device)
    positions = torch.randint(0, max_len, (T,), generator=gen).to(device)
    caches = [torch.full((4, 4, kv_heads, head_dim), float("nan"), dtype=dtype, device=device)
              for _ in range(2)]
    slots = torch.tensor([5, 0, 15, -1, 9, 2, 11], device=device)
    want_q = fused_ref.rotary_ref(q.cpu(), cos.cpu()[positions.cpu()][:, None],
                                  sin.cpu()[positions.cpu()][:, None])
    want_k = fused_ref.rotary_ref(k.cpu(), cos.cpu()[positions.cpu()][:, None],
                                  sin.cpu()[positions.cpu()][:, None])
    want = [c.cpu().clone() for c in caches]
    keep = (slots >= 0).cpu()
    write_kv(want[0], want[1], want_k[keep], v.cpu()[keep], slots.cpu()[keep])
    attn.rotary_write_kv_cache(q, k, v, positions, cos, sin, caches[0], caches[1], slots)
    assert rel_err(q, want_q) <= TOL[dtype] and rel_err(k, want_k) <= TOL[dtype]
    for got, exp in zip(caches, want, strict=True):
        got = got.cpu()
        assert torch.equal(got.isnan(), exp.isnan())  # exactly the mapped slots written
        assert rel_err(got[~got.isnan()], exp[~exp.isnan()]) <= TOL[dtype]


def test_rotary_write_kv_cache_names_bad_tables(device: torch.device) -> None:
    q = torch.zeros(2, 4, 16, device=device)
    kv = torch.zeros(2, 2, 16, device=device)
    cache = torch.zeros(2, 4, 2, 16, device=device)
    pos = slots = torch.zeros(2, dtype=torch.int64, device=device)
    table = torch.zeros(8, 16, device=device)
    with pytest.raises(ValueError, match=r"^sin: expected a contiguous float32"):
        attn.rotary_write_kv_cache(q, kv, kv, pos, table, table.half(), cache, cache, slots)
    with pytest.raises(ValueError, match=r"^positions"):
        attn.rotary_write_kv_cache(q, kv, kv, pos.int(), table, table, cache, cache, slots)


@pytest.mark.parametrize("contexts,new", [([70, 130], [70, 100]), ([20, 90], [4, 90])],
                         ids=("prompts: 64 x 64 tiles", "chunks: 16 x 32 tiles"))
def test_default_tiles_match_reference(device: torch.device, contexts: list[int],
                                       new: list[int]) -> None:
    gen = torch.Generator().manual_seed(seed_of("default-tiles", contexts, new))
    c = make_case(gen, device, torch.float16, contexts, new, 4, 2, 16, 8)
    out = torch.full_like(c["q"], float("nan"))
    attn.paged_prefill(c["q"], c["k_cache"], c["v_cache"], c["cu_t"], c["seq_lens_t"],
                       c["tables_t"], c["scale"], out)
    assert not torch.isnan(out).any()
    assert rel_err(out, reference(c)) <= TOL[torch.float16]


def test_bad_arguments_are_named(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(0)
    c = make_case(gen, device, torch.float32, [4], [4], 4, 2, 16, 4)
    out = torch.empty_like(c["q"])
    with pytest.raises(ValueError, match=r"^q.shape\[1\] \(heads\): expected a multiple"):
        attn.paged_prefill(c["q"][:, :3], c["k_cache"], c["v_cache"], c["cu_t"], c["seq_lens_t"],
                           c["tables_t"], 1.0, out[:, :3])
    with pytest.raises(ValueError, match=r"^block_tables.dtype: expected torch.int32"):
        attn.paged_prefill(c["q"], c["k_cache"], c["v_cache"], c["cu_t"], c["seq_lens_t"],
                           c["tables_t"].long(), 1.0, out)
    where = c["q"].device  # with its index on a GPU: cuda:0
    with pytest.raises(ValueError, match=rf"^block_tables.device: expected {where}, got meta"):
        attn.paged_decode(c["q"][:1], c["k_cache"], c["v_cache"], c["seq_lens_t"],
                          c["tables_t"].to("meta"), 1.0, out[:1])
    with pytest.raises(ValueError, match=r"^k_cache.dtype"):
        attn.paged_decode(c["q"][:1], c["k_cache"].half(), c["v_cache"], c["seq_lens_t"],
                          c["tables_t"], 1.0, out[:1])
    with pytest.raises(ValueError, match=r"^max_context"):
        attn.paged_decode(c["q"][:1], c["k_cache"], c["v_cache"], c["seq_lens_t"], c["tables_t"],
                          1.0, out[:1], workspace=attn.DecodeWorkspace.allocate(1, 4, 16, 2,
                                                                                device))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("heads,kv_heads", [(32, 32), (32, 8)])
def test_llama_sizes_on_gpu(dtype: torch.dtype, heads: int, kv_heads: int) -> None:
    gen = torch.Generator().manual_seed(seed_of(dtype, heads, kv_heads))
    device = torch.device("cuda")
    contexts = [512, 2048, 1, 700, 1500]
    c = make_case(gen, device, dtype, contexts, [512, 1, 1, 64, 1], heads, kv_heads, 128, 16)
    out = torch.full_like(c["q"], float("nan"))
    attn.paged_prefill(c["q"], c["k_cache"], c["v_cache"], c["cu_t"], c["seq_lens_t"],
                       c["tables_t"], c["scale"], out, block_m=64, block_n=64)
    assert rel_err(out, reference(c)) <= TOL[dtype]
    d = make_case(gen, device, dtype, contexts, [1] * 5, heads, kv_heads, 128, 16)
    out = torch.full_like(d["q"], float("nan"))
    ws = attn.DecodeWorkspace.allocate(5, heads, 128, 8, device)
    attn.paged_decode(d["q"], d["k_cache"], d["v_cache"], d["seq_lens_t"], d["tables_t"],
                      d["scale"], out, max_context=2048, workspace=ws, block_n=64)
    assert rel_err(out, reference(d)) <= TOL[dtype]
