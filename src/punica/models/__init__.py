"""Model definitions (the LLaMA-architecture family) and checkpoint loading."""
