"""CUDA graphs for engine steps over static buffers: decode-only steps, and mixed steps (prefill
chunks beside decodes) of up to MAX_MIXED_TOKENS rows.

A step of T rows over B sequences runs in the graph of its key: decode-only steps (T == B) the
graph of the smallest sequence bucket >= B (two of them with a DecodeSplit: contexts split or
not, as `DecodeSplit.wanted` says of the step), mixed steps the graph of (token bucket >= T,
sequence bucket >= B). Inputs are copied into the graph's static buffers; the rest is padding:

- rows T.. are token 0 at position 0, KV slot -1 (the write kernel skips it), outside every
  sequence (cu_seqlens stays at T) and every LoRA segment (segments past the real ones are empty,
  slot -1); their hidden states are computed and ignored;
- sequences B.. (decode graphs: rows B..) have context 1 over block 0 (read, never written) and,
  in mixed graphs, no query rows;
- logits rows past the real ones read row 0; their logits are ignored.

The graph holds everything the step launches: embeddings, fused q/k/v and gate/up GEMMs with their
SGMV deltas, rotary, KV write, paged attention (decode kernel in decode graphs, prefill kernel in
mixed ones), norms, LM head. Launch geometry depends only on the key, never on the data, which is
what makes replay valid. With capture=False the padded static step runs eagerly (CPU tests of the
padding logic).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from punica.engine.batch import Batch
from punica.lora.pool import LoraPool
from punica.models.attention_backends import BACKENDS, AttentionBackend
from punica.models.llama import CausalLM, StepContext, decode_split_of
from punica.models.rope import Rotary
from punica.ops.attention import DecodeSplit

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512)
MAX_MIXED_TOKENS = TOKEN_BUCKETS[-1]

Key = tuple[int, int, bool, bool]
"""(token bucket, sequence bucket, decode_only, split): split only on decode-only keys."""


def buckets_of(max_batch: int, max_tokens: int) -> tuple[list[int], list[int]]:
    """(sequence buckets up to max_batch, token buckets of mixed steps up to the rows the LoRA
    workspace is sized for)."""
    return ([b for b in BUCKETS if b < max_batch] + [max_batch],
            [t for t in TOKEN_BUCKETS if t <= max_tokens])


def graph_keys(buckets: list[int], token_buckets: list[int], split: bool) -> list[Key]:
    """Every key a step can have: decode buckets (split and not, with a DecodeSplit), and
    (token, sequence) bucket pairs of mixed steps (a mixed step has more rows than sequences, so
    its token bucket is never below its sequence bucket)."""
    splits = (False, True) if split else (False,)
    decode = [(b, b, True, s) for b in buckets for s in splits]
    return decode + [(t, b, False, False) for t in token_buckets for b in buckets if b <= t]


def kept_bytes(keys: list[Key], vocab_size: int, max_blocks: int) -> int:
    """Bytes every graph of `keys` keeps between replays: its static inputs (outside the graph
    pool) and its float32 logits (inside it). What a capture frees returns to the shared pool
    for the next capture, so the pool's transient part is that of the largest graph."""
    total = 0
    for tokens, seqs, _, _ in keys:
        total += 3 * 8 * tokens + seqs * (8 + 4 * max_blocks + 4 * 4) + 4 * 2 * (seqs + 1)
        total += 4 * seqs * vocab_size
    return total


@dataclass
class _Static:
    batch: Batch
    num_logits: int
    split: bool
    logits: torch.Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None


class StepGraphs:
    def __init__(self, model: CausalLM, kv_cache: torch.Tensor, rotary: Rotary,
                 lora: LoraPool | None, max_batch: int, max_blocks: int, device: torch.device,
                 attention: AttentionBackend = BACKENDS["triton"], capture: bool = True,
                 max_tokens: int = MAX_MIXED_TOKENS,
                 lora_stream: torch.cuda.Stream | None = None,
                 decode_split: DecodeSplit | None = None) -> None:
        self.model, self.kv_cache, self.rotary, self.lora = model, kv_cache, rotary, lora
        self.decode_split = decode_split
        """Its workspace must hold max_batch sequences (the split graphs' padded batches)."""
        self.lora_stream = lora_stream
        """Side stream of the LoRA shrinks (StepContext.lora_stream): forked from and joined
        back into the capturing stream inside each graph."""
        self.device, self.attention, self.capture = device, attention, capture
        self.buckets, self.token_buckets = buckets_of(max_batch, max_tokens)
        self.max_blocks = max_blocks
        self._static: dict[Key, _Static] = {}
        self._pool = None
        self.capture_s = 0.0
        """Seconds spent building graphs (compiling their kernels and capturing) so far."""

    def bucket(self, batch_size: int) -> int | None:
        return next((b for b in self.buckets if b >= batch_size), None)

    def key(self, batch: Batch, split: bool | None = None) -> Key | None:
        """The graph key of a step, or None: no graph fits it. split: None, as the DecodeSplit
        wants; False, never; True, whenever there is one (benchmarks time both)."""
        seqs = self.bucket(len(batch.seq_lens))
        if seqs is None:
            return None
        if batch.decode_only:
            if split is None:
                split = decode_split_of(self.decode_split, batch) is not None
            return seqs, seqs, True, split and self.decode_split is not None
        need = max(batch.num_tokens, seqs)
        tokens = next((t for t in self.token_buckets if t >= need), None)
        return None if tokens is None else (tokens, seqs, False, False)

    def keys(self) -> list[Key]:
        """Every key a step can have (graph_keys)."""
        return graph_keys(self.buckets, self.token_buckets, self.decode_split is not None)

    def warmup(self) -> float:
        """Build every graph of `keys()` now; returns the seconds it took."""
        start = time.perf_counter()
        for key in self.keys():
            self._prepare(key)
        return time.perf_counter() - start

    @property
    def num_graphs(self) -> int:
        return len(self._static)

    def _make_static(self, key: Key) -> _Static:
        tokens, seqs, decode_only, split = key
        dev, i32, i64 = self.device, torch.int32, torch.int64
        batch = Batch(
            input_ids=torch.zeros(tokens, dtype=i64, device=dev),
            positions=torch.zeros(tokens, dtype=i64, device=dev),
            slot_mapping=torch.full((tokens,), -1, dtype=i64, device=dev),
            cu_seqlens_q=list(range(seqs + 1)), seq_lens=[1] * seqs,
            block_tables=[[0]] * seqs, logits_rows=torch.zeros(seqs, dtype=i64, device=dev),
            sampled=[], lora_indptr=torch.zeros(seqs + 1, dtype=i32, device=dev),
            lora_slots=torch.full((seqs,), -1, dtype=i32, device=dev), order=[],
            cu_seqlens_q_t=torch.arange(seqs + 1, dtype=i32, device=dev),
            seq_lens_t=torch.ones(seqs, dtype=i32, device=dev),
            block_tables_t=torch.zeros(seqs, self.max_blocks, dtype=i32, device=dev),
            decode_only=decode_only)
        return _Static(batch, seqs, split)

    def _forward(self, s: _Static) -> torch.Tensor:
        return self.model(StepContext(s.batch, self.kv_cache, self.rotary, self.lora,
                                      self.attention, self.lora_stream,
                                      self.decode_split if s.split else None))

    def _prepare(self, key: Key) -> _Static:
        s = self._static.get(key)
        if s is None:
            start = time.perf_counter()
            s = self._make_static(key)
            if self.capture:
                self._forward(s)  # compile every kernel outside the capture
                torch.cuda.synchronize(self.device)
                s.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(s.graph, pool=self._pool):
                    s.logits = self._forward(s)
                self._pool = s.graph.pool()
            self._static[key] = s
            self.capture_s += time.perf_counter() - start
        return s

    def run(self, batch: Batch, split: bool | None = None,
            key: Key | None = None) -> torch.Tensor:
        """Logits [N, vocab] of the step's sampled rows (N = batch.logits_rows.numel()); split
        as in `key`; key: `self.key(batch, split)` when the caller has it already."""
        key = key or self.key(batch, split)
        if key is None:
            raise ValueError(f"batch: expected a decode-only batch of <= {self.buckets[-1]} "
                             "sequences or a mixed one within the token buckets "
                             f"{self.token_buckets}, got "
                             f"{batch.num_tokens} rows of {len(batch.seq_lens)} sequences "
                             f"(decode_only={batch.decode_only})")
        s = self._prepare(key)
        self._fill(s.batch, batch)
        n = batch.logits_rows.numel()
        if s.graph is None:
            return self._forward(s)[:n]
        s.graph.replay()
        return s.logits[:n]

    def _fill(self, st: Batch, batch: Batch) -> None:
        t, b = batch.num_tokens, len(batch.seq_lens)
        st.input_ids[:t].copy_(batch.input_ids)
        st.positions[:t].copy_(batch.positions)
        st.slot_mapping[:t].copy_(batch.slot_mapping)
        st.slot_mapping[t:].fill_(-1)
        st.seq_lens_t[:b].copy_(batch.seq_lens_t)
        st.seq_lens_t[b:].fill_(1)
        width = batch.block_tables_t.shape[1]
        st.block_tables_t[:b, :width].copy_(batch.block_tables_t)
        st.block_tables_t[:b, width:].zero_()
        st.block_tables_t[b:].zero_()
        st.cu_seqlens_q_t[: b + 1].copy_(batch.cu_seqlens_q_t)
        st.cu_seqlens_q_t[b + 1:].fill_(t)  # padding sequences: no query rows
        n = batch.logits_rows.numel()
        st.logits_rows[:n].copy_(batch.logits_rows)
        st.logits_rows[n:].zero_()
        segments = batch.lora_slots.numel()
        st.lora_indptr[: segments + 1].copy_(batch.lora_indptr)
        st.lora_indptr[segments + 1:].fill_(t)
        st.lora_slots[:segments].copy_(batch.lora_slots)
        st.lora_slots[segments:].fill_(-1)
        pad = st.seq_lens_t.numel() - b
        st.seq_lens = batch.seq_lens + [1] * pad  # host copies for the torch path
        st.block_tables = batch.block_tables + [[0]] * pad
        st.cu_seqlens_q = batch.cu_seqlens_q + [t] * pad
