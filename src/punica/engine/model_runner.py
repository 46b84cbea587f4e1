"""ModelRunner: the model, the KV pool, the adapter pool, the step graphs and the building of a
step's inputs: everything of a step below scheduling and sampling. LLMEngine drives one per
engine; the step benchmarks (bench/rig.py) drive one with random weights and hand-built batches.

A step: `prepare` builds the Batch of the scheduled sequences (uploading it once, filling the
rows whose token is still on the device from the previous step), `execute` runs it: in the CUDA
graph of its shape when one fits (decode-only steps, and mixed steps of up to 512 rows), else
eagerly, and returns float32 logits of the sampled rows.

Memory (CUDA, num_blocks unset): the KV pool is sized last, from what is left under
gpu_memory_utilization once the weights, the adapter pool and the workspaces are allocated, less
what a step needs beside them: the peak of an eager step of the largest batch (forward and
sampling, measured by running one: engine/sizing.py) and the graphs' private pool (measured the
same way on the largest graph shape, plus the outputs every graph keeps).
"""

from __future__ import annotations

import logging

import torch

from punica.config import EngineConfig
from punica.engine.batch import Batch, build_batch
from punica.engine.cuda_graph import Key, StepGraphs
from punica.engine.inflight import InFlight
from punica.engine.scheduler import ScheduledSeq
from punica.engine.sizing import MemoryPlan, plan_memory
from punica.lora.peft import AdapterWeights
from punica.lora.pool import LoraPool
from punica.models.attention_backends import AttentionBackend, attention_backend
from punica.models.llama import CausalLM, StepContext, decode_split_of
from punica.models.loader import load_model
from punica.models.rope import Rotary
from punica.ops.attention import DecodeSplit

log = logging.getLogger(__name__)

GraphVariant = tuple[bool, bool]
"""(LoRA pool in the graph, each shrink beside its GEMM on the side stream)."""


def resolve_device(name: str) -> torch.device:
    """ModelConfig.device: auto is cuda when there is one, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class ModelRunner:
    def __init__(self, config: EngineConfig, model: CausalLM | None = None) -> None:
        """`model`: an already built model (random weights); else config.model.model is loaded
        from disk."""
        self.config = config
        mc, cc, lc, sc = config.model, config.cache, config.lora, config.scheduler
        self.device = device = resolve_device(mc.device)
        self.attention: AttentionBackend = attention_backend(mc.attention_backend, device)
        if model is None:
            self.model, self.arch, self.dtype = load_model(mc.model, mc.dtype, device)
        else:
            self.model, self.arch = model, model.arch
            self.dtype = model.model.embed_tokens.weight.dtype
        a = self.arch
        self.max_model_len = mc.max_model_len or a.max_position_embeddings
        self.max_tokens = sc.max_num_batched_tokens
        # The pool's kernels follow the step's: the torch backend runs the LoRA references too
        # (a CPU engine in a test session that set TRITON_INTERPRET stays off the interpreter).
        self.lora_pool = (LoraPool(a, lc.max_loras, lc.max_lora_rank, self.max_tokens,
                                   self.dtype, device,
                                   "auto" if self.attention.fused_kernels else "torch")
                          if lc.max_loras > 0 else None)
        self.fill_stream = (torch.cuda.Stream(device) if self.lora_pool is not None
                            and device.type == "cuda" else None)
        """Where slot fills are copied (load_adapter), beside the step in flight."""
        if self.fill_stream is not None:  # the pool's zeroing before any fill
            self.fill_stream.wait_stream(torch.cuda.current_stream(device))
        self.lora_stream = (torch.cuda.Stream(device) if self.lora_pool is not None
                            and self.lora_pool.capturable and lc.shrink_beside_gemm else None)
        """The side stream of the LoRA shrinks in step graphs (StepContext.lora_stream)."""
        self.graph_batch = min(sc.max_num_seqs, self.max_tokens, 512)
        self.decode_split = DecodeSplit.allocate(
            mc.decode_split_tokens if self.attention.splits_decode else 0, self.max_model_len,
            max(self.graph_batch, sc.max_num_seqs), a.num_heads, a.head_dim, device)
        """Decode steps with a context longer than one split run split them (StepContext)."""
        self.rotary = Rotary(a, self.max_model_len, device)
        self.max_blocks = -(-self.max_model_len // cc.block_size)
        self.graphs_enabled = (device.type == "cuda" and not mc.enforce_eager
                               and self.attention.capturable)
        self.memory: MemoryPlan = plan_memory(self)
        self.kv_cache = torch.zeros(a.num_layers, 2, self.memory.num_blocks, cc.block_size,
                                    a.num_kv_heads, a.head_dim, dtype=self.dtype, device=device)
        self._graphs: dict[GraphVariant, StepGraphs] = {}
        self.graphs = self.graphs_for(self.default_variant) if self.graphs_enabled else None
        """The engine's step graphs (the default variant), None when steps run eagerly."""

    @property
    def use_graphs(self) -> bool:
        """Whether steps may replay graphs: enabled, and the pool's LoRA kernels capturable
        (a test may switch the pool to its torch reference after the start)."""
        return self.graphs_enabled and (self.lora_pool is None or self.lora_pool.capturable)

    @property
    def num_blocks(self) -> int:
        return int(self.kv_cache.shape[2])

    @property
    def default_variant(self) -> GraphVariant:
        """The engine's graphs: the pool in every graph (steps without LoRA rows too), each
        shrink beside its GEMM when there is a side stream."""
        return self.lora_pool is not None, self.lora_stream is not None

    def graphs_for(self, variant: GraphVariant) -> StepGraphs:
        """The step graphs of a variant (benchmarks time the others), built on first use."""
        graphs = self._graphs.get(variant)
        if graphs is None:
            use_lora, beside = variant
            graphs = StepGraphs(self.model, self.kv_cache, self.rotary,
                                self.lora_pool if use_lora else None, self.graph_batch,
                                self.max_blocks, self.device, self.attention,
                                capture=self.device.type == "cuda", max_tokens=self.max_tokens,
                                lora_stream=self.lora_stream if beside else None,
                                decode_split=self.decode_split)
            self._graphs[variant] = graphs
        return graphs

    def load_adapter(self, slot: int, weights: AdapterWeights) -> None:
        """Copy an adapter's weights into a slot of the pool. On CUDA the copies are queued on
        the fill stream, which does not wait for the steps queued before (they run side by
        side), and every step queued after waits for them (the current stream waits for the
        fill stream before anything else is queued on it).

        Safe because no step queued before reads this slot: the engine fills only a slot whose
        previous adapter has no running request (slots.py: only unpinned slots are evicted), a
        request keeps its slot pinned until the step that finishes it has been settled, and a
        step that preempts admits nobody (so nothing is filled while the preempted request's
        last step is in flight). A request aborted or failed while its step is in flight, or one
        that stops when step k is settled while it already has a row in step k+1 (async
        scheduling), unpins its slot early; that row may then read a slot being overwritten,
        and its output is discarded (rows never mix)."""
        assert self.lora_pool is not None
        if self.fill_stream is None:
            self.lora_pool.load(slot, weights)
            return
        compute = torch.cuda.current_stream(self.device)
        try:
            with torch.cuda.stream(self.fill_stream):
                self.lora_pool.load(slot, weights)
        finally:
            compute.wait_stream(self.fill_stream)

    def warmup(self) -> float:
        """Capture every step graph now (a server's start, a benchmark's untimed part) rather
        than on the first step of each shape; returns the seconds it took (0 without graphs)."""
        return self.graphs.warmup() if self.graphs is not None and self.use_graphs else 0.0

    def prepare(self, scheduled: list[ScheduledSeq], block_tables: dict[int, list[int]],
                prev: InFlight | None = None) -> Batch:
        """The step's Batch, uploaded once; rows whose token is the previous step's (async
        scheduling: a placeholder) read it from `prev`'s tokens on the device."""
        batch = build_batch(scheduled, block_tables, self.config.cache.block_size, self.device,
                            prev.gather_index() if prev is not None else None)
        if batch.gather_rows is not None:
            assert prev is not None
            batch.input_ids.index_copy_(0, batch.gather_rows,
                                        prev.tokens.index_select(0, batch.gather_src))
        return batch

    def graph_key_of(self, batch: Batch, variant: GraphVariant | None = None,
                     split: bool | None = None) -> Key | None:
        """The key of the graph that would run this step, None: it runs eagerly."""
        if not self.use_graphs:
            return None
        return self.graphs_for(variant or self.default_variant).key(batch, split)

    def execute(self, batch: Batch, use_lora: bool | None = None, use_graphs: bool = True,
                beside: bool | None = None, split: bool | None = None) -> torch.Tensor:
        """float32 logits [N, vocab] of the batch's sampled rows.

        use_lora: None, as the engine does (graphs hold the pool; eager steps add LoRA only when
        a row has an adapter); else with or without the pool. beside: each LoRA shrink on the
        side stream beside its GEMM; None: beside in graphs (with a side stream), after it in
        eager steps (a stream fork and join per projection is host time an eager step pays).
        split: the decode attention split over the KV length; None as DecodeSplit.wanted says,
        False never, True whenever there is a DecodeSplit (benchmarks time both)."""
        in_graph = self.lora_pool is not None and use_lora is not False
        variant = in_graph, in_graph and self.lora_stream is not None and beside is not False
        key = self.graph_key_of(batch, variant, split) if use_graphs else None
        if key is not None:
            return self.graphs_for(variant).run(batch, split, key)
        if use_lora is None:
            use_lora = any(s.seq.slot >= 0 for s in batch.order)
        lora = self.lora_pool if use_lora else None
        stream = self.lora_stream if (beside and lora is not None) else None
        decode_split = decode_split_of(self.decode_split, batch) if split is None else (
            self.decode_split if split and batch.decode_only else None)
        return self.model(StepContext(batch, self.kv_cache, self.rotary, lora, self.attention,
                                      stream, decode_split))
