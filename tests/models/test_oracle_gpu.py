"""The engine on the GPU against HF transformers + PEFT on the same GPU, at float16 and bfloat16.

One batch mixes requests of three adapters (ranks 8, 4 with rsLoRA, 16) and of the base model,
interleaved, with prompts of 1 to 26 tokens; the engine runs with its defaults (Triton kernels,
CUDA graphs). HF + PEFT generates each request alone with that request's adapter (all adapters
disabled for a base request), in the same dtype (PEFT's LoRA weights kept in it too). Both are
greedy, with the float32 log-softmax of every step. The rules:

- Greedy tokens (all GEN of them): a request's tokens must equal HF's; they may part only at a
  step where HF's own top-1 logprob beats its top-2 by at most GREEDY_MARGIN (a near-tie, which
  a different rounding order may legitimately break the other way), and the request is compared
  no further. Parting at a step HF decides by more than GREEDY_MARGIN fails the test. At step 0
  this is "the engine's top-1 equals HF's wherever HF's top-1 margin exceeds GREEDY_MARGIN".
- Logprobs: at every step whose context is the same on both sides (the tokens before it agree,
  the parting step included), each of the engine's top-20 tokens has HF's logprob within
  ORACLE_TOL, and HF's top-5 tokens are all among the engine's top-20.
- Coverage: at least MIN_AGREED of the requests agree with HF over their first PREFIX tokens,
  so the near-tie allowance cannot excuse a wholesale disagreement.
- Anchor: HF + PEFT in float32 on the same GPU; at step 0 (the prompt alone, so the same
  context on every side) the engine's and HF's 16-bit logprobs are both within ORACLE_TOL of it.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from punica import LLM, SamplingParams
from punica.engine.scheduler import SchedulerOutput
from tests.checkpoints import make_family
from tests.models.test_generation_vs_hf import FAMILIES

pytestmark = pytest.mark.gpu
DEVICE = "cuda"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# Max |logprob difference| of one token between the engine and HF + PEFT at one 16-bit dtype.
# Both are correct 16-bit evaluations of one function that round in a different order (fused
# q/k/v and gate/up GEMMs, SGMV deltas vs PEFT's two matmuls, paged Triton attention vs SDPA,
# fused norms). float16: the project bounds the engine's own float16 error against float32 by
# 0.02 (LOGPROB_TOL in test_engine_gpu.py, one prompt); two evaluations can err in opposite
# directions, here over 12 prompts, up to 8 steps and 20 tokens each: 0.05. bfloat16 keeps 3
# fewer significant bits (8 against 11): 8 times that. The same bounds serve the float32 anchor:
# one 16-bit side's rounding instead of two, but the 16-bit sides share the rounding of the
# weights, which moves them together away from float32.
ORACLE_TOL = {"float16": 0.05, "bfloat16": 0.4}
# HF's top-1 logprob margin over its top-2 up to which the engine may pick another token: the
# error of a difference of two logprobs (the shared log-normaliser cancels) is of the order of
# one logprob's, so a rounding-order difference flips no wider margin.
GREEDY_MARGIN = ORACLE_TOL
GEN = 8
"""Greedy tokens generated per request (max_tokens)."""
PREFIX = 4
"""The leading tokens over which a request counts as agreeing, for the coverage rule."""
MIN_AGREED = 0.5
ENGINE_LOGPROBS = 20
HF_TOP = 5


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp(f"oracle-{request.param}")
    return make_family(root, request.param, **FAMILIES[request.param])


def oracle_requests(vocab: int) -> list[tuple[list[int], str | None]]:
    """(prompt ids, adapter or None for the base model): adapters interleaved, lengths 1..26."""
    gen = torch.Generator().manual_seed(2)
    lengths_adapters = [(13, "qv8"), (3, None), (21, "all4rs"), (7, "mlp16"), (17, "qv8"),
                        (1, "all4rs"), (9, None), (26, "mlp16"), (5, "all4rs"), (11, "qv8"),
                        (15, None), (2, "mlp16")]
    return [(torch.randint(1, vocab, (n,), generator=gen).tolist(), a)
            for n, a in lengths_adapters]


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


Generation = tuple[list[int], list[torch.Tensor]]
"""Greedy tokens, and per step the float32 log-softmax over the vocabulary (CPU)."""


def hf_generate(base_dir: Path, adapters: dict[str, Path],
                requests: list[tuple[list[int], str | None]], dtype: torch.dtype
                ) -> list[Generation]:
    """HF transformers + PEFT on DEVICE at `dtype`, greedy, each request alone."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype).to(DEVICE)
    names = list(adapters)
    # autocast_adapter_dtype=False: PEFT keeps the LoRA weights in `dtype` as the engine does
    # (by default it upcasts 16-bit adapter weights to float32).
    model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0],
                                      autocast_adapter_dtype=False)
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name, autocast_adapter_dtype=False)
    model.eval()
    wrong = {n: (p.dtype, p.device) for n, p in model.named_parameters()
             if p.dtype != dtype or p.device.type != DEVICE}
    assert not wrong, wrong
    outs = []
    for prompt, adapter in requests:
        ids = torch.tensor([prompt], device=DEVICE)
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=GEN,
                      do_sample=False, eos_token_id=0, pad_token_id=0, output_logits=True,
                      return_dict_in_generate=True)
        with torch.no_grad():
            if adapter is None:
                with model.disable_adapter():
                    out = model.generate(**kwargs)
            else:
                model.set_adapter(adapter)
                out = model.generate(**kwargs)
        tokens = out.sequences[0, len(prompt):].tolist()
        steps = [step[0].float().log_softmax(-1).cpu() for step in out.logits]
        assert len(steps) == len(tokens)
        outs.append((tokens, steps))
    del model, base
    free()
    return outs


@pytest.fixture(scope="module")
def hf_fp32(family: tuple[Path, dict[str, Path]]) -> list[Generation]:
    base_dir, adapters = family
    return hf_generate(base_dir, adapters, oracle_requests(384), torch.float32)


Step = tuple[int, set[str | None], int]
"""One engine step: sequences scheduled, their adapters (None: base), sequences preempted."""


def engine_generate(base_dir: Path, adapters: dict[str, Path],
                    requests: list[tuple[list[int], str | None]], dtype: str
                    ) -> tuple[list[tuple[list[int], list[dict[int, float]]]], list[Step]]:
    """The engine's (tokens, per-step logprobs) of every request, all submitted at once, and its
    steps."""
    llm = LLM(str(base_dir), dtype=dtype, device=DEVICE, max_loras=len(adapters),
              max_lora_rank=16, max_model_len=48, num_kv_blocks=64)
    for name, path in adapters.items():
        llm.load_lora(name, str(path))
    steps: list[Step] = []
    schedule = llm.engine.scheduler.schedule

    def recording_schedule() -> SchedulerOutput:
        out = schedule()
        steps.append((len(out.scheduled), {s.seq.adapter for s in out.scheduled},
                      len(out.preempted)))
        return out

    llm.engine.scheduler.schedule = recording_schedule
    params = SamplingParams(max_tokens=GEN, temperature=0.0, logprobs=ENGINE_LOGPROBS)
    outs = llm.generate([p for p, _ in requests], params, lora=[a for _, a in requests],
                        use_tqdm=False)
    graphs = llm.engine.runner.graphs  # CUDA graphs on (the default), and replayed
    assert graphs is not None and graphs._static, "the steps ran without CUDA graphs"
    got = [(o.token_ids, o.outputs[0].logprobs) for o in outs]
    del llm, outs, graphs
    free()
    return got, steps


def check_logprobs(ours: dict[int, float], ref: torch.Tensor, tol: float, where: str) -> float:
    """The engine's logprobs of one step against a reference log-softmax: returns the largest
    difference."""
    assert len(ours) >= ENGINE_LOGPROBS, where
    missing = [t for t in ref.topk(HF_TOP).indices.tolist() if t not in ours]
    assert not missing, f"{where}: HF's top-{HF_TOP} tokens {missing} not in the engine's list"
    worst = max(abs(lp - ref[t].item()) for t, lp in ours.items())
    assert worst < tol, f"{where}: logprobs differ by {worst:.4f} (tolerance {tol})"
    return worst


def margin(ref: torch.Tensor) -> float:
    top2 = ref.topk(2).values
    return (top2[0] - top2[1]).item()


def agreed_steps(ours: list[int], ref: Generation, greedy_margin: float, where: str) -> int:
    """How many leading tokens the engine shares with HF; they may part only at a near-tie of
    HF's (margin <= greedy_margin)."""
    tokens, steps = ref
    for i, (a, b) in enumerate(zip(ours, tokens, strict=False)):
        if a != b:
            m = margin(steps[i])
            assert m <= greedy_margin, (f"{where}: token {i} is {a}, HF's {b} leads by "
                                        f"{m:.4f} > {greedy_margin}: {ours} vs {tokens}")
            return i
    assert len(ours) == len(tokens), f"{where}: {ours} vs {tokens}"
    return len(tokens)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_mixed_batch_matches_hf_peft_on_gpu(family: tuple[Path, dict[str, Path]],
                                            hf_fp32: list[Generation], dtype: str) -> None:
    base_dir, adapters = family
    requests = oracle_requests(384)
    ours, steps = engine_generate(base_dir, adapters, requests, dtype)
    # One batch: a step scheduled every request, of every adapter and the base, none preempted.
    assert any(n == len(requests) and kinds == {None, *adapters} for n, kinds, _ in steps), steps
    assert sum(p for _, _, p in steps) == 0, steps
    hf = hf_generate(base_dir, adapters, requests, DTYPES[dtype])
    tol, greedy_margin = ORACLE_TOL[dtype], GREEDY_MARGIN[dtype]
    agreed = []
    for i, ((tokens, logprobs), ref, ref32, (_, adapter)) in enumerate(
            zip(ours, hf, hf_fp32, requests, strict=True)):
        where = f"request {i} ({adapter or 'base'}, {dtype})"
        assert len(logprobs) == len(tokens), where
        n = agreed_steps(tokens, ref, greedy_margin, where)
        agreed.append(n)
        # Steps 0..n have the same context on both sides (the tokens before each agree).
        for step in range(min(n + 1, len(tokens), len(ref[0]))):
            check_logprobs(logprobs[step], ref[1][step], tol, f"{where}, step {step}")
        # The float32 anchor, at step 0: the engine near it, and HF's 16-bit run near it too.
        check_logprobs(logprobs[0], ref32[1][0], tol, f"{where}, step 0 vs HF float32")
        hf_top = ref32[1][0].topk(HF_TOP).indices
        worst = (ref[1][0][hf_top] - ref32[1][0][hf_top]).abs().max().item()
        assert worst < tol, f"{where}: HF's {dtype} step 0 is {worst:.4f} off its float32"
    full = sum(n >= min(PREFIX, len(ref[0])) for n, ref in zip(agreed, hf, strict=True))
    assert full >= MIN_AGREED * len(requests), (
        f"{full} of {len(requests)} requests agree over {PREFIX} tokens; agreed steps {agreed}")
