"""Punica: serve many LoRA fine-tunes of one base LLM from shared GPUs."""

from punica.engine.sampling_params import SamplingParams
from punica.llm import LLM

__all__ = ["LLM", "SamplingParams"]
__version__ = "0.1.0"
