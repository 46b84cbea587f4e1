"""Paged attention ops (Triton) beside `attention_ref.py` (pure torch).

    write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
        k_cache.view(-1, H_kv, D)[slot_mapping[t]] = k[t]   (slot < 0: row skipped)
    rotary_write_kv_cache(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping)
        q, k = rotary(q), rotary(k) in place (positions int64 [T], cos/sin float32 [max_len, D]
        as `fused.rotary_`), then write_kv_cache(k, v, ...): one launch
    paged_prefill(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables, scale, out)
        rows cu[b]:cu[b+1] of q are the last positions of sequence b (context seq_lens[b], already
        in the cache): out = softmax(q K^T * scale, causal) V per sequence and head
    paged_decode(q, k_cache, v_cache, seq_lens, block_tables, scale, out, max_context=None,
                 workspace=None, merge_in_kernel=True)
        the same with exactly one query row per sequence (q [B, H, D]); with a DecodeWorkspace the
        context (at most max_context) is split into `num_splits` runs of
        cdiv(max_context, num_splits) tokens, one program each per (sequence, KV head), merged
        by the last split of the sequence to finish (merge_in_kernel) or by a second kernel

Shapes: q/out [T, H, D]; caches [num_blocks, block_size, H_kv, D] (H a multiple of H_kv, grouped
query heads h // (H / H_kv)); cu_seqlens_q int32 [B + 1]; seq_lens int32 [B]; block_tables int32
[B, max_blocks]. No host sync, no allocation (the split workspace comes from the caller).
Checks and launch parameters are derived once per argument signature (`launch.sig` of each
tensor and the scalars) and the compiled kernels relaunched directly (`launch.KernelLaunch`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from punica.ops.attention_kernels import (
    decode_reduce_kernel,
    kv_write_kernel,
    paged_decode_kernel,
    paged_prefill_kernel,
    rotary_kv_write_kernel,
)
from punica.ops.checks import ACT_DTYPES, check_vector, expect, interpreting
from punica.ops.launch import KernelLaunch, PlanCache, cdiv, next_power_of_2, sig
from punica.ops.tiles import block_s, grid_rows


@dataclass(frozen=True)
class DecodeWorkspace:
    """Split-KV partials: part_out [B, H, S, D] and part_lse [B, H, S], float32; counters
    [B, H] int32, all 0 between launches (the in-kernel merge counts finished splits there and
    its merger resets them: a launch cut short would leave them dirty, so they are never shared
    between streams)."""

    part_out: torch.Tensor
    part_lse: torch.Tensor
    counters: torch.Tensor

    @classmethod
    def allocate(cls, max_seqs: int, num_heads: int, head_dim: int, num_splits: int,
                 device: torch.device) -> DecodeWorkspace:
        return cls(torch.empty(max_seqs, num_heads, num_splits, head_dim, device=device),
                   torch.empty(max_seqs, num_heads, num_splits, device=device),
                   torch.zeros(max_seqs, num_heads, dtype=torch.int32, device=device))

    @property
    def num_splits(self) -> int:
        return int(self.part_lse.shape[2])


@dataclass(frozen=True)
class DecodeSplit:
    """How decode steps split their contexts: runs of `split_tokens` tokens (the last one of a
    context shorter), one program each, merged in the kernel, over a workspace for up to
    `max_seqs` sequences of at most `max_context` tokens. Taken by the steps where some context
    is longer than one run (`wanted`): elsewhere every context is one run and splitting would
    only add empty programs."""

    workspace: DecodeWorkspace
    max_context: int
    split_tokens: int

    MAX_SPLITS = 16
    """Past this many runs per context the runs grow instead (the workspace stays small)."""

    @classmethod
    def allocate(cls, split_tokens: int, max_context: int, max_seqs: int, num_heads: int,
                 head_dim: int, device: torch.device) -> DecodeSplit | None:
        """None where no context can span two runs (split_tokens 0 turns splitting off)."""
        if split_tokens <= 0 or max_context <= split_tokens or max_seqs <= 0:
            return None
        splits = min(cls.MAX_SPLITS, cdiv(max_context, split_tokens))
        workspace = DecodeWorkspace.allocate(max_seqs, num_heads, head_dim, splits, device)
        return cls(workspace, max_context, _split_length(max_context, splits, DECODE_BLOCK_N))

    def wanted(self, seq_lens: list[int]) -> bool:
        """Whether a decode step over these contexts should split them."""
        return (0 < len(seq_lens) <= self.workspace.counters.shape[0]
                and max(seq_lens) > self.split_tokens)


def _split_length(max_context: int, splits: int, block_n: int) -> int:
    """Tokens per split: max_context over `splits` runs, rounded up to whole key tiles."""
    return cdiv(cdiv(max_context, splits), block_n) * block_n


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, q: torch.Tensor) -> None:
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        expect(c.dim() == 4, name, "[num_blocks, block_size, kv_heads, head_dim]",
               tuple(c.shape))
        expect(c.is_contiguous(), name, "a contiguous tensor", f"strides {c.stride()}")
        expect(c.dtype == q.dtype, f"{name}.dtype", str(q.dtype), c.dtype)
        expect(c.device == q.device, f"{name}.device", str(q.device), c.device)
    expect(k_cache.shape == v_cache.shape, "v_cache.shape", str(tuple(k_cache.shape)),
           tuple(v_cache.shape))
    expect(k_cache.shape[3] == q.shape[2], "k_cache.shape[3] (head_dim)", str(q.shape[2]),
           k_cache.shape[3])
    expect(q.shape[1] % k_cache.shape[2] == 0, "q.shape[1] (heads)",
           f"a multiple of kv_heads ({k_cache.shape[2]})", q.shape[1])


def _check_q(name: str, q: torch.Tensor) -> None:
    expect(q.dim() == 3, name, "a 3-D tensor [tokens, heads, head_dim]", tuple(q.shape))
    expect(q.dtype in ACT_DTYPES, f"{name}.dtype", "float16, bfloat16 or float32", q.dtype)
    expect(q.stride(2) == 1, f"{name}.stride(2)", "1", q.stride(2))


def _check_tables(seq_lens: torch.Tensor, block_tables: torch.Tensor, num_seqs: int,
                  device: torch.device) -> None:
    check_vector("seq_lens", seq_lens, torch.int32, device, num_seqs)
    expect(block_tables.dim() == 2 and block_tables.shape[0] == num_seqs, "block_tables",
           f"an int32 tensor [{num_seqs}, max_blocks]", tuple(block_tables.shape))
    expect(block_tables.dtype == torch.int32, "block_tables.dtype", "torch.int32",
           block_tables.dtype)
    expect(block_tables.device == device, "block_tables.device", str(device),
           block_tables.device)
    expect(block_tables.stride(1) == 1, "block_tables.stride(1)", "1", block_tables.stride(1))


def _common(q: torch.Tensor, k_cache: torch.Tensor) -> dict[str, object]:
    fp32 = q.dtype == torch.float32
    return dict(HEAD_DIM=q.shape[2], BLOCK_D=max(16, next_power_of_2(q.shape[2])),
                BLOCK_SIZE=k_cache.shape[1], PRECISION="ieee" if fp32 else "tf32",
                DOT_FP32=fp32 or (interpreting() and q.dtype == torch.bfloat16))


DECODE_BLOCK_N = 32
"""Keys per tile of the decode kernel."""

PREFILL_TALL_ROWS = 64
"""Mean new rows per sequence from which paged_prefill takes 64 x 64 tiles."""

_WRITE: PlanCache[KernelLaunch | None] = PlanCache()
_ROTARY_WRITE: PlanCache[KernelLaunch | None] = PlanCache()
_PREFILL: PlanCache[KernelLaunch | None] = PlanCache()
_DECODE: PlanCache[tuple[KernelLaunch | None, KernelLaunch | None]] = PlanCache()


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """k_cache.view(-1, H_kv, D)[slot_mapping] = k, same for v; k, v [T, H_kv, D]."""
    key = (sig(k), sig(v), sig(k_cache), sig(v_cache), sig(slot_mapping))
    launch = _WRITE.get(key, _write_plan, k, v, k_cache, v_cache, slot_mapping)
    if launch is not None:
        launch(k, v, k_cache, v_cache, slot_mapping)


def _write_plan(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                slot_mapping: torch.Tensor) -> KernelLaunch | None:
    _check_q("k", k)
    _check_q("v", v)
    _check_cache(k_cache, v_cache, k)
    expect(k.shape == v.shape and k.shape[1:] == k_cache.shape[2:], "k.shape[1:]",
           str(tuple(k_cache.shape[2:])), tuple(k.shape[1:]))
    check_vector("slot_mapping", slot_mapping, torch.int64, k.device, k.shape[0])
    if k.shape[0] == 0:
        return None
    return KernelLaunch(
        kv_write_kernel, (k.shape[0], k.shape[1]), 5,
        (k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(1),
         k_cache.stride(2)),
        dict(HEAD_DIM=k.shape[2], BLOCK_D=next_power_of_2(k.shape[2])), {})


def rotary_write_kv_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slot_mapping: torch.Tensor) -> None:
    """q, k [T, H(_kv), D] rotated in place by their rows' positions, then k and v [T, H_kv, D]
    written to the slots of slot_mapping (negative: skipped)."""
    key = (sig(q), sig(k), sig(v), sig(positions), sig(cos), sig(sin), sig(k_cache),
           sig(v_cache), sig(slot_mapping))
    launch = _ROTARY_WRITE.get(key, _rotary_write_plan, q, k, v, positions, cos, sin, k_cache,
                               v_cache, slot_mapping)
    if launch is not None:
        launch(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping)


def _rotary_write_plan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> KernelLaunch | None:
    _check_q("q", q)
    _write_plan(k, v, k_cache, v_cache, slot_mapping)  # the checks of write_kv_cache
    T, H, D = q.shape
    expect(k.shape[0] == T, "k.shape[0]", str(T), k.shape[0])
    expect(D % 2 == 0 and (D // 2) & (D // 2 - 1) == 0, "q.shape[2]",
           "an even head_dim whose half is a power of two", D)
    check_vector("positions", positions, torch.int64, q.device, T)
    for name, table in (("cos", cos), ("sin", sin)):
        expect(table.dim() == 2 and table.shape[1] == D and table.dtype == torch.float32
               and table.is_contiguous() and table.device == q.device, name,
               f"a contiguous float32 [max_len, {D}] table on {q.device}",
               (tuple(table.shape), table.dtype, str(table.device)))
    expect(sin.shape == cos.shape, "sin.shape", str(tuple(cos.shape)), tuple(sin.shape))
    if T == 0:
        return None
    block_h = min(next_power_of_2(H), 8)
    q_programs = cdiv(H, block_h)
    return KernelLaunch(
        rotary_kv_write_kernel, (T, q_programs + cdiv(k.shape[1], block_h)), 9,
        (H, k.shape[1], q_programs, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
         v.stride(0), v.stride(1), cos.stride(0), k_cache.stride(1), k_cache.stride(2)),
        dict(HALF=D // 2, BLOCK_H=block_h), dict(num_warps=2))


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                  block_tables: torch.Tensor, scale: float, out: torch.Tensor,
                  block_m: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """Causal varlen attention of new query rows over the paged context (see module doc).

    Tiles (default): 64 x 64 when the sequences bring >= 64 new rows on average (prompt
    prefill: each query tile streams its sequence's whole context, so taller tiles read K/V
    fewer times; sm_90 ptxas: 228 registers, no spills at head_dim 128), else 16 x 32 (chunks
    beside decodes, where taller tiles would be mostly masked rows)."""
    if block_m is None:
        block_m = 64 if q.shape[0] >= PREFILL_TALL_ROWS * max(seq_lens.numel(), 1) else 16
    if block_n is None:
        block_n = 64 if block_m >= 64 else 32
    key = (sig(q), sig(k_cache), sig(v_cache), sig(cu_seqlens_q), sig(seq_lens),
           sig(block_tables), scale, sig(out), block_m, block_n)
    launch = _PREFILL.get(key, _prefill_plan, q, k_cache, v_cache, cu_seqlens_q, seq_lens,
                          block_tables, scale, out, block_m, block_n)
    if launch is not None:
        launch(q, k_cache, v_cache, out, cu_seqlens_q, seq_lens, block_tables)
    return out


def _prefill_plan(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor,
                  block_tables: torch.Tensor, scale: float, out: torch.Tensor,
                  block_m: int, block_n: int) -> KernelLaunch | None:
    _check_q("q", q)
    _check_q("out", out)
    expect(out.shape == q.shape and out.dtype == q.dtype, "out", f"{tuple(q.shape)} {q.dtype}",
           f"{tuple(out.shape)} {out.dtype}")
    _check_cache(k_cache, v_cache, q)
    num_seqs = seq_lens.numel()
    check_vector("cu_seqlens_q", cu_seqlens_q, torch.int32, q.device, num_seqs + 1)
    _check_tables(seq_lens, block_tables, num_seqs, q.device)
    T, H = q.shape[0], q.shape[1]
    if T == 0 or num_seqs == 0:
        return None
    return KernelLaunch(
        paged_prefill_kernel, (grid_rows(T, num_seqs, block_m), H), 7,
        (num_seqs, scale, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
         k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0)),
        dict(GROUP=H // k_cache.shape[2], BLOCK_M=block_m, BLOCK_N=block_n,
             BLOCK_S=block_s(num_seqs), **_common(q, k_cache)), {})


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                 out: torch.Tensor, max_context: int | None = None,
                 workspace: DecodeWorkspace | None = None, block_n: int = DECODE_BLOCK_N,
                 merge_in_kernel: bool = True) -> torch.Tensor:
    """One query row per sequence. With `workspace` the context (at most `max_context` tokens,
    a host-side bound such as max_model_len) is split over workspace.num_splits programs."""
    part_out = workspace.part_out if workspace is not None else out
    part_lse = workspace.part_lse if workspace is not None else seq_lens
    counters = workspace.counters if workspace is not None else seq_lens
    key = (sig(q), sig(k_cache), sig(v_cache), sig(seq_lens), sig(block_tables), scale,
           sig(out), max_context, workspace is not None, sig(part_out), sig(part_lse),
           sig(counters), block_n, merge_in_kernel)
    attend, merge = _DECODE.get(key, _decode_plan, q, k_cache, v_cache, seq_lens, block_tables,
                                scale, out, max_context, workspace, block_n, merge_in_kernel)
    if attend is not None:
        attend(q, k_cache, v_cache, out, part_out, part_lse, seq_lens, block_tables, counters)
    if merge is not None:
        merge(part_out, part_lse, out)
    return out


def _decode_plan(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float,
                 out: torch.Tensor, max_context: int | None, workspace: DecodeWorkspace | None,
                 block_n: int, merge_in_kernel: bool
                 ) -> tuple[KernelLaunch | None, KernelLaunch | None]:
    _check_q("q", q)
    _check_q("out", out)
    expect(out.shape == q.shape and out.dtype == q.dtype, "out", f"{tuple(q.shape)} {q.dtype}",
           f"{tuple(out.shape)} {out.dtype}")
    _check_cache(k_cache, v_cache, q)
    B, H, D = q.shape
    _check_tables(seq_lens, block_tables, B, q.device)
    splits = workspace.num_splits if workspace is not None else 1
    if splits > 1:
        expect(max_context is not None and max_context >= 1, "max_context",
               "the longest possible context (>= 1) when splitting", max_context)
        expect(workspace.part_out.shape[0] >= B and workspace.part_out.shape[1] == H and
               workspace.part_out.shape[3] == D, "workspace.part_out.shape",
               f"[>= {B}, {H}, splits, {D}]", tuple(workspace.part_out.shape))
        c = workspace.counters
        expect(c.dtype == torch.int32 and c.dim() == 2 and c.shape[0] >= B and
               c.shape[1] >= k_cache.shape[2] and c.stride(1) == 1 and c.device == q.device,
               "workspace.counters", f"int32 [>= {B}, >= {k_cache.shape[2]}] on {q.device}",
               f"{c.dtype} {tuple(c.shape)} strides {c.stride()} on {c.device}")
    if B == 0:
        return None, None
    per_split = _split_length(max_context or 1, splits, block_n)
    if splits == 1:
        per_split = 2**31 - 1
    part_out = workspace.part_out if workspace is not None else out
    part_lse = workspace.part_lse if workspace is not None else seq_lens
    split = splits > 1
    group = H // k_cache.shape[2]
    common = _common(q, k_cache)
    attend = KernelLaunch(
        paged_decode_kernel, (B, k_cache.shape[2], splits), 9,
        (scale, per_split, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
         k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
         part_out.stride(0), part_out.stride(1), part_out.stride(2) if split else 0,
         part_lse.stride(0) if split else 0, part_lse.stride(1) if split else 0,
         workspace.counters.stride(0) if split else 0),
        dict(GROUP=group, GROUP_P2=max(16, next_power_of_2(group)), BLOCK_N=block_n,
             NUM_SPLITS=splits, MERGE_IN_KERNEL=merge_in_kernel and split,
             FENCE=not interpreting(), **common), {})
    if not split or merge_in_kernel:
        return attend, None
    merge = KernelLaunch(
        decode_reduce_kernel, (B, H), 3,
        (part_out.stride(0), part_out.stride(1), part_out.stride(2), part_lse.stride(0),
         part_lse.stride(1), out.stride(0), out.stride(1)),
        dict(NUM_SPLITS=splits, SPLITS_P2=next_power_of_2(splits), HEAD_DIM=D,
             BLOCK_D=common["BLOCK_D"]), {})
    return attend, merge
