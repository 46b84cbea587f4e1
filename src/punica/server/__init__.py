"""The OpenAI-compatible HTTP server (FastAPI): `model` names the base model or an adapter."""
