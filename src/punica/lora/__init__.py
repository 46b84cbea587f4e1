"""LoRA adapters: PEFT parsing and validation, slot bookkeeping, weight pools."""
