"""CUDA graphs for decode-only steps, one per batch-size bucket, over static buffers.

A decode step of B sequences runs in the graph of the smallest bucket >= B. Its inputs are copied
into the bucket's static buffers; rows B.. are padding: token 0 at position 0, KV slot -1 (the
write kernel skips it), context 1 over block 0 (read, never written), outside every LoRA segment
(segments past the real ones are empty, slot -1). Their logits are computed and ignored. The
graph holds everything the step launches: embeddings, 7 projections + SGMV per layer, rotary,
KV write, split-free paged decode, final norm and LM head; launch geometry depends only on the
bucket, never on the data, which is what makes replay valid.

With capture=False the same padded static batch runs eagerly (CPU tests of the padding logic).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from punica.engine.batch import Batch
from punica.lora.pool import LoraPool
from punica.models.llama import CausalLM, StepContext
from punica.models.rope import Rotary

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass
class _Static:
    batch: Batch
    logits: torch.Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None


class DecodeGraphs:
    def __init__(self, model: CausalLM, kv_cache: torch.Tensor, rotary: Rotary,
                 lora: LoraPool | None, max_batch: int, max_blocks: int, device: torch.device,
                 attention_backend: str = "triton", capture: bool = True) -> None:
        self.model, self.kv_cache, self.rotary, self.lora = model, kv_cache, rotary, lora
        self.device, self.backend, self.capture = device, attention_backend, capture
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        self.max_blocks = max_blocks
        self._static: dict[int, _Static] = {}
        self._pool = None

    def bucket(self, batch_size: int) -> int | None:
        return next((b for b in self.buckets if b >= batch_size), None)

    def _make_static(self, size: int) -> _Static:
        dev, i32, i64 = self.device, torch.int32, torch.int64
        batch = Batch(
            input_ids=torch.zeros(size, dtype=i64, device=dev),
            positions=torch.zeros(size, dtype=i64, device=dev),
            slot_mapping=torch.full((size,), -1, dtype=i64, device=dev),
            cu_seqlens_q=list(range(size + 1)), seq_lens=[1] * size,
            block_tables=[[0]] * size, logits_rows=torch.arange(size, dtype=i64, device=dev),
            sampled=[], lora_indptr=torch.zeros(size + 1, dtype=i32, device=dev),
            lora_slots=torch.full((size,), -1, dtype=i32, device=dev), order=[],
            cu_seqlens_q_t=torch.arange(size + 1, dtype=i32, device=dev),
            seq_lens_t=torch.ones(size, dtype=i32, device=dev),
            block_tables_t=torch.zeros(size, self.max_blocks, dtype=i32, device=dev),
            decode_only=True)
        return _Static(batch)

    def _forward(self, s: _Static) -> torch.Tensor:
        return self.model(StepContext(s.batch, self.kv_cache, self.rotary, self.lora,
                                      self.backend))

    def _prepare(self, size: int) -> _Static:
        s = self._static.get(size)
        if s is None:
            s = self._make_static(size)
            if self.capture:
                self._forward(s)  # compile every kernel outside the capture
                torch.cuda.synchronize(self.device)
                s.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(s.graph, pool=self._pool):
                    s.logits = self._forward(s)
                self._pool = s.graph.pool()
            self._static[size] = s
        return s

    def run(self, batch: Batch) -> torch.Tensor:
        """Logits [B, vocab] of a decode-only batch (B <= the largest bucket)."""
        n = batch.num_tokens
        size = self.bucket(n)
        if size is None or not batch.decode_only:
            raise ValueError(f"batch: expected a decode-only batch of <= {self.buckets[-1]} "
                             f"sequences, got {n} rows (decode_only={batch.decode_only})")
        s = self._prepare(size)
        self._fill(s.batch, batch, n, size)
        if s.graph is None:
            return self._forward(s)[:n]
        s.graph.replay()
        return s.logits[:n]

    def _fill(self, st: Batch, batch: Batch, n: int, size: int) -> None:
        st.input_ids[:n].copy_(batch.input_ids)
        st.positions[:n].copy_(batch.positions)
        st.slot_mapping[:n].copy_(batch.slot_mapping)
        st.slot_mapping[n:].fill_(-1)
        st.seq_lens_t[:n].copy_(batch.seq_lens_t)
        st.seq_lens_t[n:].fill_(1)
        width = batch.block_tables_t.shape[1]
        st.block_tables_t[:n, :width].copy_(batch.block_tables_t)
        st.block_tables_t[n:].zero_()
        segments = batch.lora_slots.numel()
        st.lora_indptr[: segments + 1].copy_(batch.lora_indptr)
        st.lora_indptr[segments + 1:].fill_(n)
        st.lora_slots[:segments].copy_(batch.lora_slots)
        st.lora_slots[segments:].fill_(-1)
        st.seq_lens = batch.seq_lens + [1] * (size - n)  # host copies for the torch path
        st.block_tables = batch.block_tables + [[0]] * (size - n)
