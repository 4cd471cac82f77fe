"""`megaloom serve`: an OpenAI- and Megatron-compatible HTTP API over the inference engine,
with continuous batching, streaming, health and Prometheus metrics, and a web writing
assistant at `/`. `create_app` builds the FastAPI app; `megaloom.commands.serve` runs it."""

from megaloom.serve.app import create_app

__all__ = ["create_app"]
