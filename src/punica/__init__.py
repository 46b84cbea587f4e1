"""Punica: serve many LoRA fine-tunes of one base LLM from shared GPUs."""

__version__ = "0.1.0"
